"""fedpeat: federated parameter-efficient emulator-assisted tuning of language models.

Third-party messages that no user can act on are silenced here, once for every process that
imports the library (the ServerApp, the ClientApps, the tools): each by its exact text and
category, so our own warnings and every other third-party message still show.
"""

import logging
import warnings

_IGNORED_WARNINGS = (
    # torch 2.13 warns when transformers/peft, on import, touch the deprecated TorchScript API.
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),
    # transformers 5 asks its own callers (peft, its trainer utilities) to rename a property.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # Ray's notice about a future default, raised by the ray.init inside Flower's simulation.
    (FutureWarning, r"Tip: In future versions of Ray, Ray will no longer override accelerator"),
)
for _category, _message in _IGNORED_WARNINGS:
    warnings.filterwarnings("ignore", message=_message, category=_category)


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes' CPU backend tries to fetch a kernel from a model hub at import, and logs a
# warning to `pip install kernels` when it cannot; its own CPU path is used either way.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community")
)
# LLM.int8 casts bf16/fp32 inputs to fp16 by design, and bitsandbytes logs so on every forward
# pass: one line per step of every 8-bit device, hundreds in one default run.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    _DropMessage("MatMul8bitLt: inputs will be cast")
)
