#!/usr/bin/env bash
# Run every extension study (one Hydra multirun each, one after another), then the report.
# Over two hours on a shared 2-core CPU, most of it the capacity study's 3,000 steps; see
# experiments/README.md for each study's time.
set -euo pipefail
cd "$(dirname "$0")/.."
for study in "${@:-study_linear study_masking study_stateless study_topology study_long study_capacity}"; do
  for s in $study; do
    python run.py -m experiment="$s" threads=1  # as the tables were made (threads=auto may pick 2)
  done
done
python experiments/report.py
