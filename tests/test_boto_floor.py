"""The boto3 floor in pyproject.toml allows only botocore versions that can send ``If-None-Match`` with PutObject,
the conditional write the S3 lease is made of (modalmill/io/lease.py).

Found by reading botocore's S3 service model (``botocore/data/s3/2006-03-01/service-2.json.gz``,
``PutObjectRequest`` members) in the released wheels: 1.34.162, 1.35.0 and 1.35.1 lack ``IfNoneMatch``, 1.35.2 has
it; boto3 1.35.2 requires ``botocore>=1.35.2,<1.36.0`` (1.35.1 allows botocore 1.35.1)."""

import os
import re

import boto3
import botocore
import pytest

from modalmill.io import lease

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3])


def test_the_boto3_floor_is_the_first_release_with_conditional_put():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        floors = re.findall(r'"boto3>=([0-9.]+)', f.read())
    assert floors == [lease.BOTO3_CONDITIONAL_PUT] == ["1.35.2"]


def test_the_installed_botocore_has_if_none_match_on_put_object():
    assert _version(boto3.__version__) >= _version(lease.BOTO3_CONDITIONAL_PUT)
    client = boto3.session.Session().client("s3", region_name="us-east-1", aws_access_key_id="x",
                                            aws_secret_access_key="x")
    assert "IfNoneMatch" in client.meta.service_model.operation_model("PutObject").input_shape.members
    lease._require_conditional_put(client.meta.service_model)  # no error


def test_a_botocore_without_it_is_a_clear_error():
    """The installed S3 model with ``IfNoneMatch`` taken out of PutObject, as botocore 1.35.1 ships it."""
    import copy

    from botocore.loaders import Loader
    from botocore.model import ServiceModel

    data = copy.deepcopy(Loader().load_service_model("s3", "service-2"))
    del data["shapes"]["PutObjectRequest"]["members"]["IfNoneMatch"]
    with pytest.raises(RuntimeError, match=rf"botocore {re.escape(botocore.__version__)} cannot .* boto3>=1\.35\.2"):
        lease._require_conditional_put(ServiceModel(data, "s3"))
