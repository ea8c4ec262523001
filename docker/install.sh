#!/bin/sh
# Installs ftp-gateway from the source tree SRC into a new virtual environment VENV: `install.sh VENV SRC`.
#
# The Dockerfile's builder stage runs this script, and tests/test_container.py runs the same script into a
# temporary venv and starts the image's ENTRYPOINT + CMD from it: the two cannot drift apart. Only the
# server's own dependencies are installed (no [dev] or [test] extras), so a module that `serve` imports by
# mistake from those extras fails the test, as it would fail the image. PYTHON picks the interpreter
# (default python3, the image's /usr/local/bin/python3).
set -eu
venv="$1"
src="$2"
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install --disable-pip-version-check "$src"
# The installer is not needed at run time: fewer files, fewer scanner findings.
"$venv/bin/pip" uninstall --yes --quiet pip
