#!/usr/bin/env bash
# Prepare, on the development machine, what bench/device_run.sh needs on the H200 and its image lacks:
#   .whl/     cp312 manylinux wheels of READAR's services stack (Celery, kombu, redis-py, SQLAlchemy, Alembic,
#             Mako, psycopg, pydantic, pydantic-settings and their own needs), at the versions of this venv;
#   .devbin/  redis-server with the shared libraries it links beyond glibc, for the real-worker row.
# Both folders are git-ignored and travel with `run(carry=[".whl", ".devbin"])` (well under the 64 MiB limit).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(celery kombu billiard vine amqp click-didyoumean click-plugins click-repl prompt_toolkit wcwidth
          tzlocal redis sqlalchemy alembic mako psycopg psycopg-binary pydantic pydantic-core
          pydantic-settings annotated-types typing-inspection python-dotenv)
pins=()
for name in "${packages[@]}"; do
    version=$(python -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
    [ -n "$version" ] || { echo "device_prep: $name is not installed here; run pip install -e '.[dev]' first" >&2; exit 1; }
    pins+=("$name==$version")
done
rm -rf .whl && mkdir -p .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${pins[@]}"
rm -rf .devbin && mkdir -p .devbin
server=$(command -v redis-server) || { echo "device_prep: no redis-server here (apt-get install redis-server)" >&2; exit 1; }
cp -L "$server" .devbin/
ldd "$server" | awk '/=> \// {print $3}' | grep -v -E '/(libc|libm|libpthread|libdl|librt|ld-linux)[.-]' \
    | xargs -I{} cp -L {} .devbin/
echo "device_prep: $(ls .whl | wc -l) wheels in .whl, $(du -sh .devbin | cut -f1) in .devbin; total $(du -shc .whl .devbin | tail -1 | cut -f1)"
