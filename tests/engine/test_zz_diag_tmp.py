import sys
sys.path.insert(0, "/work/main/tests/engine")
from test_dual_cfg_engine import *  # noqa
def test_diag(engine, ip2p, diffusers_ip2p):
    for steps, st, si in [(1, 1.0, 1.0), (1, 7.5, 1.5), (2, 7.5, 1.5), (4, 1.0, 1.0), (4, 7.5, 1.5)]:
        print(steps, st, si, parity_run(engine, ip2p, diffusers_ip2p, steps, st, si), flush=True)
