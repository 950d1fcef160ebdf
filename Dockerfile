# pgqueue: one image for the API, the workers and the migration job (docker-compose.yml).
#
# The first stage builds pgqueue's wheel (the migrations are package data inside it); the
# image installs that wheel, not the source tree, at the versions in constraints.txt.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pgqueue ./pgqueue
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# alembic.ini: `alembic upgrade head` works in the image too (it migrates the installed
# package's migrations, like `pgqueue migrate`).
COPY constraints.txt alembic.ini /app/
COPY --from=build /wheels /wheels
# The redis extra: REDIS_URL is an optional cache; without Redis nothing changes but speed.
RUN pip install -c constraints.txt "$(ls /wheels/pgqueue-*.whl)[redis]" \
    && rm -rf /wheels \
    && python -c "from pgqueue import migrate; print('migrations up to', migrate.head_revision())" \
    && useradd --create-home --uid 10001 pgqueue

USER pgqueue
# Only used if DATABASE_URL is unset (the embedded server); compose always sets it.
ENV PGQUEUE_HOME=/home/pgqueue/.pgqueue

EXPOSE 8000
CMD ["pgqueue", "serve", "--host", "0.0.0.0", "--port", "8000"]
