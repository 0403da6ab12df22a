# syntax=docker/dockerfile:1
# Three images from one file, each a `target` of docker-compose.yml:
#   mlflow     the tracking server (PostgreSQL backend, artifacts on a volume or S3/MinIO)
#   dashboard  optuna-dashboard, with the same Optuna as the workers (its schema must match theirs)
#   worker     the project itself, running sweep jobs
# No secret is built in: credentials reach the containers as environment variables from .env at run
# time, and .dockerignore keeps .env, local stores and outputs out of the build context.
FROM python:3.11.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 1000 app
WORKDIR /app
COPY deploy/constraints.txt /tmp/constraints.txt

FROM base AS mlflow
RUN pip install -c /tmp/constraints.txt "mlflow[auth]" "psycopg[binary]" boto3
# The volume mounted on /mlflow inherits this owner: artifacts and the auth database live there.
RUN mkdir -p /mlflow/artifacts /mlflow/auth && chown -R app /mlflow
USER app
EXPOSE 5000

FROM base AS dashboard
RUN pip install -c /tmp/constraints.txt optuna optuna-dashboard "psycopg[binary]"
USER app
EXPOSE 8080

FROM base AS worker
# The CPU build by default; a GPU image: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
# a C compiler for the fused statistics kernel (src/stats/fused.c); without one the slower torch path runs
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
# hydra_plugins/: where Hydra finds our sweeper (hparams_search=grid|tpe); conf/ is installed with the package
COPY pyproject.toml README.md ./
COPY src ./src
COPY conf ./conf
COPY hydra_plugins ./hydra_plugins
RUN pip install -c /tmp/constraints.txt ".[grpc]" && chown -R app /app
USER app
CMD ["python", "-m", "src.train", "debug=fast"]
