# One image for everything kmnist-tune runs in docker-compose.yml: the CLI, GPU workers, the
# dashboard and the storage proxy. Build: `docker compose build` (or `docker build -t kmnist-tune .`);
# where no registry is reachable, scripts/build-image builds it on a local Debian base.
#
# The CUDA PyTorch base brings torch and torchvision. pip installs the rest of the project around
# them and may not replace them: a constraints file pins the base's own builds, so a dependency
# that wants another torch fails the build instead of pulling a multi-GB wheel. The base's torch
# must lie in pyproject.toml's range (torch>=2.4,<=2.14.1; torchvision>=0.19,<=0.29.1).
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Where pip finds packages, for a build without PyPI (a mirror, or a folder of wheels served on the
# build host): pip reads these as its settings; they are not kept in the image. No credentials here: a
# build argument shows in `docker history`.
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/etc/kmnist-tune/pip-constraints.txt

# torch.compile builds code when a trial starts: inductor's C++ kernels on a CPU with g++, Triton's
# launcher on a GPU with gcc, both against the running Python's headers (Python.h). The CUDA runtime
# base has no compiler (its conda Python brings its headers); the local Debian base has neither.
# Installed only where missing, from the base's own packages, so that any Debian or Ubuntu base works:
# on the local Debian base it adds 295 MB (6.73 -> 7.03 GB; README, "Scale out").
RUN set -eu; \
    include=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
    missing=""; \
    command -v gcc >/dev/null || missing="$missing gcc"; \
    command -v g++ >/dev/null || missing="$missing g++"; \
    [ -f "$include/Python.h" ] || missing="$missing python$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')-dev"; \
    if [ -n "$missing" ]; then \
      echo "installing:$missing"; \
      apt-get update -q; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing; \
      apt-get clean; rm -rf /var/lib/apt/lists/*; \
    fi; \
    printf '#include <Python.h>\nint main(void) { return 0; }\n' | g++ -x c++ -I"$include" -fsyntax-only -

RUN mkdir -p /etc/kmnist-tune \
 && python -c "import importlib.metadata as m; print(*(f'{p}=={m.version(p)}' for p in ('torch', 'torchvision')), sep='\n')" \
      > /etc/kmnist-tune/pip-constraints.txt \
 && cat /etc/kmnist-tune/pip-constraints.txt

# The project (only what .dockerignore lets into the build context): its dependencies first, from
# pyproject.toml alone (a placeholder package and README), so that a change to the code or the README
# reuses that layer; then the code itself. The `server` extra brings gunicorn, which the dashboard serves with.
COPY pyproject.toml /tmp/kmnist-tune/
RUN mkdir /tmp/kmnist-tune/kmnist_tune \
 && touch /tmp/kmnist-tune/kmnist_tune/__init__.py /tmp/kmnist-tune/README.md \
 && python -m pip install '/tmp/kmnist-tune[server]' \
 && python -m pip uninstall -y kmnist-tune \
 && rm -r /tmp/kmnist-tune
COPY pyproject.toml README.md /tmp/kmnist-tune/
COPY kmnist_tune /tmp/kmnist-tune/kmnist_tune
RUN python -m pip install --no-deps /tmp/kmnist-tune \
 && rm -rf /tmp/kmnist-tune \
 && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
 && kmnist-tune --version

# A non-root user. The data cache and the artifact store are volumes it owns (a named volume
# starts as a copy of the image's folder, ownership included); the data is downloaded and
# md5-checked at first use, never baked into the image.
ARG KMNIST_UID=10001
ARG KMNIST_GID=10001
RUN groupadd --gid "${KMNIST_GID}" kmnist \
 && useradd --uid "${KMNIST_UID}" --gid kmnist --create-home --shell /usr/sbin/nologin kmnist \
 && mkdir -p /data /artifacts /app \
 && chown kmnist:kmnist /data /artifacts /app
COPY sweeps /app/sweeps

# Study artifacts (LR plots, checkpoints, kept models) live in the study's PostgreSQL database, which
# every host reaches; /artifacts only holds this container's W&B offline runs.
# Every cache and control folder in /tmp, so that the root filesystem may be read-only (compose's
# read_only with a tmpfs at /tmp; Kubernetes' readOnlyRootFilesystem with an emptyDir there): the XDG
# folders (W&B's service, pip, anything else that follows them), W&B's own, matplotlib's, and the
# compilers' (inductor's and Triton's; they fill again in each new container).
ENV KMNIST_TUNE_DATA=/data \
    WANDB_DIR=/artifacts \
    WANDB_CACHE_DIR=/tmp/wandb/cache \
    WANDB_CONFIG_DIR=/tmp/wandb/config \
    WANDB_DATA_DIR=/tmp/wandb/data \
    XDG_CACHE_HOME=/tmp/cache \
    XDG_CONFIG_HOME=/tmp/config \
    XDG_DATA_HOME=/tmp/share \
    XDG_STATE_HOME=/tmp/state \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_HOME=/tmp \
    TRITON_CACHE_DIR=/tmp/triton
VOLUME ["/data", "/artifacts"]
WORKDIR /app
USER kmnist

ENTRYPOINT ["kmnist-tune"]
CMD ["--help"]
