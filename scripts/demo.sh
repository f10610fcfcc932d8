#!/usr/bin/env bash
# Fresh machine → working demo: install everything, then generate a demo folder (images, captions, spoken
# audio, narrated videos), index it with the bundled demo model and query it text→image, image→text,
# audio→image, and text→moment and audio→moment in the videos.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m mmsearch demo "${1:-demo-media}"
