# The stealsim image: every role (API, inference worker, attacker, demo, grid worker) is one
# `stealsim` command on it. Building needs the network (PyPI and the PyTorch CPU index).
#   docker build -t stealsim .
# For CUDA inference workers, build with a CUDA wheel index, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t stealsim:cuda .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# torch first and pinned, from the CPU index: an unpinned torch from PyPI pulls GBs of CUDA packages.
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY stealsim ./stealsim
COPY victim_server ./victim_server
COPY defense ./defense
COPY attacker ./attacker
COPY experiments ./experiments
COPY cli ./cli
COPY examples ./examples
RUN pip install . && stealsim --help > /dev/null

RUN mkdir -p /data /reports
EXPOSE 8000
CMD ["stealsim", "--help"]
