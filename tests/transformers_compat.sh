#!/usr/bin/env bash
# The model tests against another transformers release than the one in .venv, which stays untouched:
#   bash tests/transformers_compat.sh 5.17.0      # the release on the H200 image (bench/device_run.sh)
#   bash tests/transformers_compat.sh 5.0.0       # the lowest release pyproject.toml accepts
# A scratch venv sees every package of .venv (one .pth line) and pip installs into it only the release asked for
# and whatever of its needs .venv does not satisfy; the scratch venv comes first on sys.path, so those win.
# Extra arguments go to pytest. Run from anywhere, after the README's install.
set -euo pipefail
version=${1:?usage: bash tests/transformers_compat.sh VERSION [pytest arguments] (e.g. 5.17.0)}
shift
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "transformers_compat: no .venv here; install as the README says first" >&2; exit 1; }
scratch=$(mktemp -d /tmp/readar-transformers-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch"
venv_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
scratch_site=$("$scratch/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# addsitedir (not a bare path) so that .venv's own .pth files, the editable install among them, apply too.
echo "import site; site.addsitedir('$venv_site')" > "$scratch_site/readar-venv.pth"
"$scratch/bin/python" -m pip install -q --disable-pip-version-check "transformers==$version"
"$scratch/bin/python" -c "import transformers, torch; print('transformers', transformers.__version__, \
'from', transformers.__file__, '| torch', torch.__version__)"
tests=(tests/test_read_tokenizer.py tests/test_read_loader.py tests/test_read_decode.py tests/test_decode_levers.py
       tests/test_sam_fast.py tests/test_read_sam_fidelity.py tests/test_read_detector.py
       tests/test_detector_levers.py tests/test_read_sasp.py tests/test_lisa.py tests/test_pixellm.py
       tests/test_gpu_bench.py)
"$scratch/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" "$@"
