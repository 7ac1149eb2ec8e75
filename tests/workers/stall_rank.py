"""launch/pretrain.py, but rank STALL_RANK stops answering at its STALL_AT_STEP-th forward, as a
rank stuck in a kernel or on a dead filesystem would: the others must end the job within
train.collective_timeout_s. Writes STALL_MARK (a file) when it stalls. For tests only.

    STALL_RANK=1 STALL_AT_STEP=3 STALL_MARK=f deepspeed --num_gpus 2 tests/workers/stall_rank.py ARGS
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import sst_dist.train as train  # noqa: E402

real_loss = train.lm_loss
calls = 0


def stalling_loss(model, block):
    global calls
    calls += 1
    if int(os.environ.get("RANK", "0")) == int(os.environ["STALL_RANK"]) and calls >= int(os.environ["STALL_AT_STEP"]):
        # a stuck rank would not reach its checkpoint either: let the launcher's SIGTERM end it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        Path(os.environ["STALL_MARK"]).write_text(str(time.time()))
        while True:
            time.sleep(60)
    return real_loss(model, block)


train.lm_loss = stalling_loss
sys.argv = [str(ROOT / "launch" / "pretrain.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
