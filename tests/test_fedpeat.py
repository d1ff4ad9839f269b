"""The package's import-time set-up: third-party messages no user can act on are silenced,
ours and every other warning still show."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging, warnings
import fedpeat
logging.basicConfig(level=logging.INFO)
warnings.warn("`torch.jit.script_method` is deprecated. Please switch", DeprecationWarning)
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning)
warnings.warn(
    "Tip: In future versions of Ray, Ray will no longer override accelerator", FutureWarning
)
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s", "no hub")
warnings.warn("fedpeat: our own warning", UserWarning)
warnings.warn("some other library is deprecated", DeprecationWarning)
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes message")
"""


def test_known_third_party_noise_is_silenced_and_the_rest_shows() -> None:
    out = subprocess.run(
        [sys.executable, "-W", "default", "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    log = out.stderr
    for silenced in ("script_method", "is_gradient_checkpointing", "Tip: In future", "gemm_4bit"):
        assert silenced not in log, log
    for shown in ("our own warning", "some other library", "another bitsandbytes message"):
        assert shown in log, log
