# rlad-megatron GPU image: NGC PyTorch (CUDA, torch, apex, Transformer Engine) + Megatron-Core + SGLang.
#
#   docker build -t rlad-megatron:0.1.0 .
#   enroot import -o rlad-megatron.sqsh dockerd://rlad-megatron:0.1.0   # then launch.container_image=<path>
#
# Two Python environments, because SGLang pins its own torch build and installing it next to the trainer
# would replace the image's torch (and break the apex / Transformer Engine builds made against it):
#   the image's python   trainer: rlad-megatron, megatron-core (torch / apex / TE from NGC, held by constraints)
#   /opt/sglang          rollout and teacher servers + router; the node agent finds it via RLAD_SGLANG_PYTHON
# The NGC 25.xx images ship Python 3.12, where megatron-core up to 0.19.x installs; 0.16.1 is pinned because the
# code is tested against it (the CPU environment is Python 3.11, where 0.16.1 is the newest).
ARG NGC_PYTORCH=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${NGC_PYTORCH}

ARG MEGATRON_CORE=0.16.1
ARG SGLANG=0.5.23
ARG SGLANG_ROUTER=0.3.2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    RLAD_SGLANG_PYTHON=/opt/sglang/bin/python

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/sglang \
    && /opt/sglang/bin/pip install "sglang[all]==${SGLANG}" "sglang-router==${SGLANG_ROUTER}"

WORKDIR /opt/rlad-megatron
COPY setup.py README.md ./
COPY rlad_megatron ./rlad_megatron
COPY slurm ./slurm
COPY examples ./examples
# Constrain pip to the image's torch / TE / apex / flash-attn so no dependency can swap them out.
RUN pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine|apex|flash[-_]attn)==' > /tmp/ngc.txt \
    && pip install -c /tmp/ngc.txt "megatron-core==${MEGATRON_CORE}" -e . \
    && python -c "import megatron.core, transformer_engine, rlad_megatron.cli"

# A fixed high uid: Ubuntu 24.04 based images already have uid 1000 (user "ubuntu").
RUN useradd --create-home --uid 10001 rlad && chown -R rlad /opt/rlad-megatron
USER 10001
CMD ["rlad", "--help"]
