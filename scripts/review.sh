#!/usr/bin/env bash
# Review a change in CI: run the study, compare its metrics with a baseline git ref and write
# a Markdown review (see --help). Runs in the git repository of the current directory.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash scripts/review.sh [--base REF] [--no-repro] [--out FILE] [--plots-dir DIR]

Review the change checked out here against a baseline git ref:
  1. run the study (`dvc repro`), unless --no-repro (then the outputs already in the
     work tree are used, e.g. when an earlier CI step ran the pipeline);
  2. compare reports/metrics.json with the baseline's committed one (metrics are
     `cache: false`, so they are in git and this needs no DVC remote);
  3. write a Markdown review: each configuration/task's macro AUROC change, marked
     "within noise" when no larger than this run's 95% CI half-width ((hi - lo) / 2),
     else "beyond noise"; the `dvc metrics diff REF --md` table; the plots whose data
     changed, with the HTML of `dvc plots diff REF -o DIR` written to DIR.

Options:
  --base REF        baseline git ref (default: main; in a PR job: origin/<base branch>,
                    which needs a checkout with full history, fetch-depth: 0)
  --no-repro        do not run `dvc repro`; use the outputs in the work tree
  --out FILE        write the review to FILE
  --plots-dir DIR   where `dvc plots diff` writes its HTML, relative to the repository
                    root (default: dvc_plots; replaced on each run)
  -h, --help        show this help

The review goes to --out FILE when given, else is appended to $GITHUB_STEP_SUMMARY when
that is set (the job summary of a GitHub Actions step), else printed on stdout. Progress
and DVC's own output go to stderr.
EOF
}

die() {
  echo "review.sh: error: $*" >&2
  exit 1
}

base=main
repro=1
out=""
plots_dir=dvc_plots
metrics=reports/metrics.json
while [ $# -gt 0 ]; do
  case "$1" in
    --base) [ $# -ge 2 ] || die "--base needs a git ref"; base=$2; shift 2 ;;
    --base=*) base=${1#*=}; shift ;;
    --no-repro) repro=0; shift ;;
    --out) [ $# -ge 2 ] || die "--out needs a file"; out=$2; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    --plots-dir) [ $# -ge 2 ] || die "--plots-dir needs a folder"; plots_dir=$2; shift 2 ;;
    --plots-dir=*) plots_dir=${1#*=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "review.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
[ -n "$base" ] || die "--base is empty (in a workflow: is github.base_ref set? it is only on pull_request)"
[ -n "$plots_dir" ] || die "--plots-dir is empty"
# --out is relative to where the script was started, not to the repository root.
if [ -n "$out" ] && [ "${out#/}" = "$out" ]; then out="$PWD/$out"; fi

root=$(git rev-parse --show-toplevel 2>/dev/null) || die "$PWD is not in a git repository"
cd "$root"
[ -f dvc.yaml ] || die "no dvc.yaml in $root: run this in the pipeline's repository"
if [ -x .venv/bin/python ]; then export PATH="$root/.venv/bin:$PATH"; fi
command -v dvc >/dev/null || die "dvc not found on PATH (set up the environment: bash scripts/setup.sh)"
command -v python >/dev/null || die "python not found on PATH (bash scripts/setup.sh makes .venv)"

git rev-parse --verify --quiet "$base^{commit}" >/dev/null ||
  die "baseline ref $base not found in $root (fetch it, e.g. git fetch origin; a CI checkout needs fetch-depth: 0)"
git cat-file -e "$base:$metrics" 2>/dev/null ||
  die "baseline ref $base has no $metrics (commit dvc.lock and $metrics after dvc repro there)"

if [ "$repro" = 1 ]; then
  echo "[review] dvc repro" >&2
  dvc repro >&2
fi
[ -f "$metrics" ] ||
  die "$metrics not found in the work tree of $root (run dvc repro, or leave out --no-repro)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git show "$base:$metrics" >"$tmp/base.json"
echo "[review] dvc metrics diff $base" >&2
dvc metrics diff "$base" --md >"$tmp/metrics_diff.md"

echo "[review] dvc plots diff $base -o $plots_dir" >&2
if [ -d "$plots_dir" ] && [ ! -f "$plots_dir/index.html" ] && [ -n "$(ls -A "$plots_dir")" ]; then
  die "--plots-dir $plots_dir holds files other than a dvc plots output: refusing to replace it"
fi
rm -rf "$plots_dir"
dvc plots diff "$base" -o "$plots_dir" >&2
dvc plots diff "$base" --json >"$tmp/plots.json" # the same data, to find the changed plots

args=(
  "$tmp/base.json" "$metrics"
  --base-ref "$base"
  --metrics-diff "$tmp/metrics_diff.md"
  --plots-json "$tmp/plots.json"
  --plots-html "$plots_dir/index.html"
)
if [ -n "$out" ]; then
  python -m fedcxr.review "${args[@]}" --out "$out"
  echo "[review] review -> $out" >&2
elif [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
  python -m fedcxr.review "${args[@]}" >>"$GITHUB_STEP_SUMMARY"
  echo "[review] review -> the job summary (\$GITHUB_STEP_SUMMARY)" >&2
else
  python -m fedcxr.review "${args[@]}"
fi
