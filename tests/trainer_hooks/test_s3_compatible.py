"""An S3-compatible server that is not moto: s3rver over HTTPS.

s3rver does not decode the ``aws-chunked`` bodies that botocore sends by default over HTTPS
(flexible checksums): it stores the framing inside the object. spotguard must work with it out
of the box (it asks for checksums only where required on an endpoint that is not AWS), and when
a user forces botocore's default anyway, the first save must fail loudly, naming the cause and
the fix, instead of "succeeding" and failing at the next resume.
"""

from __future__ import annotations

import pytest
import torch

from spotguard.errors import UploadFailed
from spotguard.trainer_hooks import CheckpointStore, SpotGuard, TransferSettings

MiB = 2**20


@pytest.fixture
def on_s3rver(s3rver_https, monkeypatch) -> str:
    for name, value in s3rver_https.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        monkeypatch.delenv(name, raising=False)
    return "s3://ckpt"


def test_saves_and_resumes_out_of_the_box_over_https(on_s3rver, request, caplog):
    uri = f"{on_s3rver}/{request.node.name}"
    # 12 MiB of weights: a multipart upload (s3rver's multipart ETags have no -N suffix).
    state = {"weight": torch.arange(3 * MiB, dtype=torch.float32), "step": 0}
    small_parts = TransferSettings(part_size=5 * MiB)
    with SpotGuard(uri, every_n_steps=2, state_dir="/none", transfer=small_parts) as guard:
        guard.restore(state)
        for step in range(1, 5):
            state["weight"] += 1
            state["step"] = step
            guard.step(step, state)
            guard._core.wait()
        guard.finish(4, state)
    verified = {result.step: result.ok for result in CheckpointStore(uri).verify()}
    assert verified == {2: True, 4: True}
    # s3rver ignores If-None-Match / If-Match: the one-writer guarantee cannot hold there.
    assert "ignores conditional writes" in caplog.text
    restored = {"weight": torch.zeros(3 * MiB), "step": -1}
    with SpotGuard(uri, state_dir="/none") as guard:
        assert guard.restore(restored) == 4
    assert torch.equal(restored["weight"], state["weight"])


def test_botocores_default_checksums_are_caught_at_the_first_save(on_s3rver, request, monkeypatch):
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")  # forced by a user
    uri = f"{on_s3rver}/{request.node.name}"
    state = {"weight": torch.ones(1024)}
    guard = SpotGuard(uri, every_n_steps=1, state_dir="/none")
    guard.restore(state)
    guard.step(1, state)
    guard._core.wait()
    with pytest.raises(UploadFailed, match="AWS_REQUEST_CHECKSUM_CALCULATION=when_required"):
        guard.step(2, state)
    guard._core.wait()
    guard.close()
    assert CheckpointStore(uri).latest() is None
