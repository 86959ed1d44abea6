"""torchrun's failure report parsed (launch/monitor.py)."""

from tunelab.launch.monitor import Failure, parse_torchrun_failure


def test_torchrun_failure_report_is_parsed():
    text = """
============================================================
tunelab FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-25_12:55:23
  host      : vm
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 26799)  (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-25_12:55:23
  host      : node-b
  rank      : 3 (local_rank: 1)
  exitcode  : -9 (pid: 26800)  (SIGKILL)
  error_file: <N/A>
============================================================"""
    failure = parse_torchrun_failure(text)
    assert failure == Failure(rank=3, local_rank=1, host="node-b", pid=26800, exitcode=-9)
    assert failure.describe() == "rank 3 (local rank 1, host node-b, pid 26800) was killed by SIGKILL"
    assert Failure(rank=2, exitcode=1).describe() == "rank 2 exited with code 1"
    assert parse_torchrun_failure("Traceback ...") is None
