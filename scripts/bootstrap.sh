# Sourced by ./xoogify, ./run-tests and .ci/run (which set $root to the checkout first):
# make sure .venv holds this project and its tools. Installs on the first run and again
# whenever pyproject.toml changes; needs only Python 3.11+.
set -e
venv="${XOOGIFY_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "xoogify: needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
stamp="$venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "xoogify: installing into $venv (first run or pyproject.toml changed)..." >&2
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[dev]" >&2
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
