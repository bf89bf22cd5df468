# rlad-megatron GPU image: SGLang's own image (CUDA 13, torch, SGLang) + Transformer Engine + Megatron-Core.
#
#   docker build -t rlad-megatron:0.1.0 .
#   enroot import -o rlad-megatron.sqsh dockerd://rlad-megatron:0.1.0   # then launch.container_image=<path>
#
# One torch, one CUDA, one NCCL. The trainer and the SGLang servers join one NCCL communicator for the weight
# sync, so both must load the same libraries. The base is SGLang's published image, whose torch is the exact one
# SGLang pins (0.5.23: torch 2.14.1 built for CUDA 13.0); Transformer Engine's PyTorch extension is compiled
# against that torch (the base is a CUDA devel image: nvcc and cuDNN headers). An NGC PyTorch base cannot do
# this: its torch is an NVIDIA build (2.x.0a0+<sha>) that never satisfies SGLang's exact pin, so installing
# SGLang would bring a second torch with its own CUDA and NCCL.
#
# The trainer's packages go into /opt/rlad, a venv layered on the image's Python (--system-site-packages): it
# loads the image's torch / NCCL, and adds what rlad-megatron pins differently from SGLang (transformers 5.23.0;
# SGLang 0.5.23 pins 5.19.0) without changing SGLang's environment. Constraints taken from the image keep pip
# from replacing torch, triton or any CUDA / NCCL wheel in either environment; the last RUN checks it.
ARG SGLANG=0.5.23
FROM lmsysorg/sglang:v${SGLANG}

ARG SGLANG
ARG SGLANG_ROUTER=0.3.2
ARG MEGATRON_CORE=0.16.1
# megatron-core 0.16.1 asks for transformer-engine[core_cu13,pytorch]>=2.9,<2.12 (its dev extra).
ARG TRANSFORMER_ENGINE=2.11.0
ARG NINJA=1.13.2
# The image's interpreter (the one with SGLang); override if a later base image moves it.
ARG SGLANG_PYTHON=/usr/bin/python3
# GPU architectures compiled into Transformer Engine's extension: A100, H100 / H200, B200.
ARG TE_CUDA_ARCHS="80;90;100"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    RLAD_SGLANG_PYTHON=${SGLANG_PYTHON}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The image's torch / CUDA / NCCL wheels, as pip constraints for everything installed below.
RUN "${SGLANG_PYTHON}" -c "from importlib.metadata import version as v; assert v('sglang') == '${SGLANG}', v('sglang')" \
    && "${SGLANG_PYTHON}" -m pip list --format=freeze \
       | grep -iE '^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' > /etc/rlad-base-pins.txt \
    && grep -q '^torch==' /etc/rlad-base-pins.txt \
    && "${SGLANG_PYTHON}" -m pip install --break-system-packages -c /etc/rlad-base-pins.txt \
       "sglang-router==${SGLANG_ROUTER}"

# The trainer's venv. --without-pip: the image's pip (seen through the system site) installs into the venv, so
# no ensurepip is needed. --no-build-isolation: Transformer Engine compiles against the image's torch, not a
# fresh torch from its build requirements.
WORKDIR /opt/rlad-megatron
COPY setup.py README.md ./
COPY rlad_megatron ./rlad_megatron
COPY slurm ./slurm
COPY examples ./examples
RUN "${SGLANG_PYTHON}" -m venv --system-site-packages --without-pip /opt/rlad \
    && /opt/rlad/bin/python -m pip install -c /etc/rlad-base-pins.txt "ninja==${NINJA}" \
    && NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS="${TE_CUDA_ARCHS}" MAX_JOBS=8 \
       /opt/rlad/bin/python -m pip install --no-build-isolation -c /etc/rlad-base-pins.txt \
       "transformer-engine[core_cu13,pytorch]==${TRANSFORMER_ENGINE}" \
       "megatron-core==${MEGATRON_CORE}" -e .
ENV PATH=/opt/rlad/bin:${PATH}

# One stack: the trainer imports the very torch SGLang runs on (same files, so the same CUDA and NCCL).
# Transformer Engine is checked by its metadata, so the check never loads CUDA code on a build host without GPUs.
RUN test "$(python -c 'import torch; print(torch.__file__)')" = \
         "$("${RLAD_SGLANG_PYTHON}" -c 'import torch; print(torch.__file__)')" \
    && python -c "from importlib.metadata import version as v; assert v('transformer_engine_torch') == '${TRANSFORMER_ENGINE}'" \
    && python -c "import megatron.core, rlad_megatron.cli" \
    && "${RLAD_SGLANG_PYTHON}" -c "import sglang, sglang_router"

# A fixed high uid: Ubuntu 24.04 based images already have uid 1000 (user "ubuntu").
RUN useradd --create-home --uid 10001 rlad && chown -R rlad /opt/rlad-megatron
USER 10001
CMD ["rlad", "--help"]
