"""Deployment entrypoint of the ``cloudsend`` flow (the flow itself lives in the installed package).

Work-pool route: ``deployments/prefect.yaml`` points at ``flows/cloudsend_batch.py:cloudsend``.

Serve route (no work pool, no worker: this process runs the flow runs)::

    python flows/cloudsend_batch.py                           # deployment cloudsend/batch, no schedule
    python flows/cloudsend_batch.py --cron "0 3 * * *" --config examples/quickstart.yaml --batch nightly

``--cron``, ``--timezone``, ``--config`` and ``--batch`` default to ``$CLOUDSEND_CRON``, ``$CLOUDSEND_TIMEZONE``,
``$CLOUDSEND_CONFIG`` and ``$CLOUDSEND_BATCH``. Then: ``prefect deployment run cloudsend/batch --param ...``.
"""

from __future__ import annotations

import argparse
import os

from cloudsend_prefect.flow import cloudsend

__all__ = ["cloudsend"]


def main(argv: list[str] | None = None) -> None:
    """Serve the flow as the deployment ``cloudsend/batch`` (see the module's docstring for the options)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    parser = argparse.ArgumentParser(description="Serve the cloudsend flow as the deployment cloudsend/batch.")
    parser.add_argument("--name", default="batch", help="deployment name (default: batch)")
    parser.add_argument("--cron", default=os.environ.get("CLOUDSEND_CRON"), help="schedule, e.g. '0 3 * * *'")
    parser.add_argument("--timezone", default=os.environ.get("CLOUDSEND_TIMEZONE", "UTC"), help="of the cron")
    parser.add_argument("--config", default=os.environ.get("CLOUDSEND_CONFIG"), help="default `config` parameter")
    parser.add_argument("--batch", default=os.environ.get("CLOUDSEND_BATCH"), help="default `batch` parameter")
    args = parser.parse_args(argv)

    parameters = {key: value for key, value in (("config", args.config), ("batch", args.batch)) if value}
    cloudsend.serve(
        name=args.name,
        schedules=[Cron(args.cron, timezone=args.timezone)] if args.cron else None,
        parameters=parameters,
        tags=["cloudsend"],
        # Runs load `cloudsend_prefect.flow.cloudsend` from the installed package, whatever the working directory.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


if __name__ == "__main__":
    main()
