"""Generate text with the base model plus a run's federated adapter.

python -m fedpeat.cli.generate runs/latest --prompt "ROMEO:" --max-new-tokens 60
python -m fedpeat.cli.generate runs/latest --prompt "ROMEO:" --base   # without the adapter
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fedpeat.config import Config, ConfigError
from fedpeat.model import load_model, load_tokenizer
from fedpeat.protocol import from_dict


def load_run_config(run_dir: Path) -> Config:
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {run_dir} a fedpeat run directory?")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(data, dict)
    return from_dict(Config, {str(k): v for k, v in data.items()})


def generate(
    run_dir: Path, prompt: str, max_new_tokens: int = 60, use_adapter: bool = True, seed: int = 0
) -> str:
    """Sample (top-p 0.9, temperature 0.8, seeded) from base + adapter; return the new text."""
    from peft import PeftModel

    cfg = load_run_config(run_dir)
    tokenizer = load_tokenizer(cfg.model)
    model: torch.nn.Module = load_model(cfg.model, cached=False)
    if use_adapter:
        adapter = run_dir / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} has no adapter_config.json: did the run complete?")
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_p=0.9,
            temperature=0.8,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, nargs="?", default=Path("runs/latest"))
    parser.add_argument("--prompt", default="ROMEO:\n")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--base", action="store_true", help="generate without the adapter")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        text = generate(args.run_dir, args.prompt, args.max_new_tokens, not args.base, args.seed)
    except (OSError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
