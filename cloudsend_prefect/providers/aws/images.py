"""What an instance boots and is: the image (given, else the latest Ubuntu LTS, with NVIDIA's driver for a GPU
type), its login user, and an instance type's vCPUs and GPUs as EC2 describes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.providers.aws.session import AwsError, EC2Client, config_client, error_code

UBUNTU_SSM = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
# A GPU type's default: Ubuntu 24.04 with NVIDIA's driver and CUDA installed (AWS's Deep Learning Base AMI).
GPU_IMAGE_SSM = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
GPU_IMAGE_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04)*"
CANONICAL = "099720109477"


def resolve_image(
    ec2: EC2Client, config: BatchConfig, inst: InstanceType, region: str, *, gpus: int = 0
) -> dict[str, Any]:
    """The image to boot (given; else the latest Ubuntu LTS, with NVIDIA's driver and CUDA for a type with
    ``gpus``); a bad id lists images that would work."""
    image_id = inst.img_id
    if image_id is None:
        image_id = _latest_gpu_ubuntu(ec2, config, region) if gpus else _latest_ubuntu(ec2, config, region)
    try:
        images = ec2.describe_images(ImageIds=[image_id])["Images"]
    except Exception as exc:
        if not error_code(exc).startswith("InvalidAMIID"):
            raise
        images = []
    if not images:
        usable = ec2.describe_images(
            Owners=[CANONICAL, "amazon"],
            Filters=[{"Name": "architecture", "Values": ["x86_64"]}, {"Name": "state", "Values": ["available"]}],
        )["Images"]
        usable = [i for i in usable if i.get("Platform") != "windows"]  # the host runtime needs a POSIX shell
        usable = sorted(usable, key=lambda i: i.get("CreationDate", ""), reverse=True)[:10]
        listing = "\n".join(f"  {i['ImageId']}  {i.get('Name', '')}" for i in usable)
        raise AwsError(f"image {image_id} does not exist in {region}; usable images there include:\n{listing}")
    return images[0]


def _latest_ubuntu(ec2: EC2Client, config: BatchConfig, region: str) -> str:
    """The newest Ubuntu 24.04 LTS image of the region."""
    return _published_image(
        ec2, config, region, UBUNTU_SSM, CANONICAL, "ubuntu/images/*ubuntu-*-24.04-amd64-server-*", "Ubuntu LTS"
    )


def _latest_gpu_ubuntu(ec2: EC2Client, config: BatchConfig, region: str) -> str:
    """The newest Deep Learning Base GPU image (Ubuntu 24.04, NVIDIA driver and CUDA) of the region."""
    return _published_image(ec2, config, region, GPU_IMAGE_SSM, "amazon", GPU_IMAGE_NAME, "Deep Learning Base GPU")


def _published_image(
    ec2: EC2Client, config: BatchConfig, region: str, parameter: str, owner: str, name: str, what: str
) -> str:
    """The newest image of a kind: from the SSM public parameter its publisher keeps current, else the newest of
    the publisher's images by that name (an account without SSM access)."""
    try:
        ssm = config_client(config, region, "ssm")
        return str(ssm.get_parameter(Name=parameter)["Parameter"]["Value"])
    except Exception:
        images = ec2.describe_images(Owners=[owner], Filters=[{"Name": "name", "Values": [name]}])["Images"]
        if not images:
            raise AwsError(f"cannot find the latest {what} image in {region}: set `img_id`") from None
        return str(max(images, key=lambda i: i.get("CreationDate", ""))["ImageId"])


# The login user an image's own cloud-init creates, found by a word of the image's name or description (the
# first that matches): what `img_username` defaults to, so an image of any of these needs no setting.
IMAGE_USERS = (
    ("ubuntu", "ubuntu"),
    ("debian", "admin"),
    ("al2023", "ec2-user"),
    ("amzn", "ec2-user"),
    ("amazon linux", "ec2-user"),
    ("rhel", "ec2-user"),
    ("red hat", "ec2-user"),
    ("suse", "ec2-user"),
    ("almalinux", "ec2-user"),
    ("centos", "centos"),
    ("fedora", "fedora"),
    ("rocky", "rocky"),
)
DEFAULT_USER = "ubuntu"  # the default image's, and the guess for an image none of the words names
_image_users: dict[tuple[str, str], str] = {}  # (region, image id) -> login user, looked up once per process


def login_user(image: dict[str, Any]) -> str:
    """The login user of ``image`` (a ``describe_images`` entry): ubuntu, admin (Debian), ec2-user (Amazon Linux,
    RHEL, SUSE)..., else ``DEFAULT_USER``."""
    text = f"{image.get('Name', '')} {image.get('Description', '')}".lower()
    return next((user for word, user in IMAGE_USERS if word in text), DEFAULT_USER)


def image_user(ec2: EC2Client, region: str, image_id: str | None) -> str:
    """The login user of the image an instance was booted from (its id is all the instance says of it), asked of
    ``ec2`` (the client of the instance's region) once per image."""
    if not image_id:
        return DEFAULT_USER
    if (region, image_id) not in _image_users:
        try:
            images = ec2.describe_images(ImageIds=[image_id])["Images"]
        except Exception as exc:  # an image deregistered since: its instances keep running
            if not error_code(exc).startswith("InvalidAMIID"):
                raise
            images = []
        _image_users[(region, image_id)] = login_user(images[0]) if images else DEFAULT_USER
    return _image_users[(region, image_id)]


@dataclass(frozen=True)
class Shape:
    """An instance type's vCPUs and GPUs."""

    vcpus: int
    gpus: int


def shape_of(ec2: EC2Client, instance_type: str) -> Shape:
    """A type's vCPUs and GPUs, as EC2 describes it."""
    try:
        info = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"][0]
    except Exception as exc:
        raise AwsError(f"unknown instance type {instance_type!r}: {exc}") from None
    gpus = sum(int(gpu.get("Count", 0)) for gpu in info.get("GpuInfo", {}).get("Gpus", []))
    return Shape(int(info["VCpuInfo"]["DefaultVCpus"]), gpus)
