# shellcheck shell=bash
# Sourced by the scripts that run on the lent GPU machine (run_gpu_tests.sh, run_quality_study.sh),
# from the repository root. Nothing can be downloaded there, so the Python packages it lacks travel
# as wheels in the git-ignored .whl/ folder (the `carry` of the run tool); `use_wheels MOD...`
# installs them into runs/wheel-site (git-ignored, inside the checkout) unless every module named
# already imports, and puts that folder and the repository on PYTHONPATH.
use_wheels() {
  local site="$PWD/runs/wheel-site"
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  local check
  check="import $(IFS=,; echo "$*")"
  python3 -c "$check" 2>/dev/null && return 0
  compgen -G ".whl/*.whl" >/dev/null || {
    echo "$* do not all import and there is no .whl/ folder: see the pip download line at the top of $0" >&2
    exit 2
  }
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
}
