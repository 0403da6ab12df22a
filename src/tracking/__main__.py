"""`python -m src.tracking replay SPOOL_FILE [TRACKING_URI]`: send what a run spooled while its server was away."""
import sys

from src.tracking.spool import replay

if len(sys.argv) >= 3 and sys.argv[1] == "replay":
    print(f"replayed {replay(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)} values")
else:
    sys.exit("usage: python -m src.tracking replay SPOOL_FILE [TRACKING_URI]")
