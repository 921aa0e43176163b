#!/bin/bash
# Runs once when the `text` environment is built on a host, before its pip packages.
echo "setting up on $(hostname)"
