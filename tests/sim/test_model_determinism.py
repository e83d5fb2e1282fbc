"""Same seed, same trace: the register model adds nothing run-dependent to the digest."""
import os
import subprocess
import sys
import textwrap

from sim.config import IfcvfConfig
from sim.ifcvf import IfcvfFunction
from sim.world import World

SCENARIO = textwrap.dedent("""
    import mmap, os
    from sim.config import IfcvfConfig
    from sim.ifcvf import IfcvfFunction
    from sim.world import World

    world = World(99)
    fn = IfcvfFunction(world, IfcvfConfig())
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(10)]
    fn.msix.host_enable(fds)
    w = lambda off, width, v, bar=0: fn.mmio_write(bar, off, width, v)
    w(0x14, 1, 1); w(0x14, 1, 3)
    w(0x08, 4, 1); w(0x0C, 4, 1); w(0x14, 1, 11)
    w(0x10, 2, 0)
    w(0x28, 4, 1, bar=4)
    for q in (0, 1):
        w(0x16, 2, q); w(0x18, 2, 256); w(0x20 + 4 * q, 4, 7, bar=4); w(0x1A, 2, q + 1); w(0x1C, 2, 1)
    w(0x14, 1, 15)
    for q in (0, 1, 0):
        w(q * 0x1000, 2, q, bar=2)
    fn.raise_queue_interrupt(1)
    fn.set_link(False)
    mem = mmap.mmap(-1, 0x2000)
    fn.iommu.map(0x10000, memoryview(mem), 0x2000)
    fn.iommu.read(0x9000, 4)
    w(0x16, 2, 0); w(0x1C, 2, 0)
    world.advance(world.cycles(100_000))
    print(world.digest(), world.trace.count)
""")


def run_in_subprocess(hash_seed):
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    out = subprocess.run([sys.executable, "-c", SCENARIO], env=env, capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(
                             os.path.dirname(os.path.abspath(__file__)))))
    return out.stdout.strip()


def test_digest_is_the_same_across_processes_and_hash_seeds():
    first, second = run_in_subprocess(1), run_in_subprocess(2)
    assert first == second
    assert int(first.split()[1]) > 15, "the scenario produced a real trace"


def test_trace_records_hold_no_fd_numbers():
    world = World(1)
    fn = IfcvfFunction(world, IfcvfConfig())
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fn.msix.host_enable([fd] * 10)
        fn.raise_config_interrupt()
        fn.mmio_write(0, 0x10, 2, 0)
        fn.raise_config_interrupt()
        world.advance(1_000)
        assert fn.msix.delivered[0] == 1
        assert not any(f"fd={fd}" in record for record in world.trace.records)
    finally:
        os.close(fd)


def test_layout_is_printable_data():
    fn = IfcvfFunction(World(0), IfcvfConfig())
    text = fn.layout.describe()
    assert "BAR0" in text and "BAR2" in text and "BAR4" in text
    assert "0x03000" in text and "live-migration block" in text
    regions = {r.name: (r.bar, r.offset) for r in fn.layout.regions()}
    assert regions["common cfg"] == (0, 0) and regions["ISR"] == (0, 0x1000)
    assert regions["device cfg (virtio-net)"] == (0, 0x2000)
    assert regions["MSI-X table"] == (0, 0x3000) and regions["MSI-X PBA"] == (0, 0x3800)
    assert regions["notify (doorbells)"] == (2, 0) and regions["live-migration block"] == (4, 0)
