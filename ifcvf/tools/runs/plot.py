"""`--plot FILE.png`: a migration's timeline (matplotlib, no display needed)."""
from __future__ import annotations


def plot_migration(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_dirty, ax_rate) = plt.subplots(2, 1, figsize=(9, 7), constrained_layout=True)
    iters = result.get("migration", {}).get("per_iteration", [])
    labels = [f"{it['leg']}.{it['iteration']}" for it in iters]
    xs = range(len(iters))
    ax_dirty.bar(xs, [it["pages_copied"] for it in iters], label="pages copied", color="#9ecae1")
    ax_dirty.plot(xs, [it["dirty_log_pages"] for it in iters], "o-", label="dirty in the vhost log (VF)")
    ax_dirty.plot(xs, [it["dirty_cpu_pages"] for it in iters], "s--", label="dirtied by the guest CPU")
    ax_dirty.set_xticks(list(xs), labels)
    ax_dirty.set_xlabel("leg.iteration")
    ax_dirty.set_ylabel("4 KiB pages")
    ax_dirty.set_yscale("symlog")
    ax_dirty.set_title(f"{result['scenario']}: pre-copy iterations")
    ax_dirty.legend()

    timeline = result.get("timeline", [])
    if len(timeline) > 1:
        # Rates over windows of 5 samples: frames arrive in batches, and a
        # per-sample rate would alias into spikes.
        ts, rx, tx = [], [], []
        for (t0, r0, x0), (t1, r1, x1) in zip(timeline, timeline[5:]):
            dt = (t1 - t0) * 1e-6
            ts.append(t1 / 1000)
            rx.append((r1 - r0) * 8 / dt / 1e9)
            tx.append((x1 - x0) * 8 / dt / 1e9)
        ax_rate.plot(ts, rx, label="to the guest (RX)")
        ax_rate.plot(ts, tx, label="from the guest (TX)")
    phases = result.get("phases_us", {})
    if "migration_start" in phases:
        ax_rate.axvline(phases["migration_start"] / 1000, color="grey", linestyle=":", label="migration starts")
    for i, t in enumerate(phases.get("switchover", [])):
        ax_rate.axvline(t / 1000, color="red", label="switch-over" if i == 0 else None)
    ax_rate.set_xlabel("simulated time (ms)")
    ax_rate.set_ylabel("Gb/s delivered")
    ax_rate.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
