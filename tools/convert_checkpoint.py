#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron formats (same as `rlad convert`).

python tools/convert_checkpoint.py hf-to-megatron --hf MODEL_DIR --out CKPT_DIR
python tools/convert_checkpoint.py megatron-to-hf --ckpt CKPT_DIR --out HF_DIR [--hf-config MODEL_DIR]
"""

import sys

from rlad_megatron.conversion.cli import main

if __name__ == "__main__":
    sys.exit(main())
