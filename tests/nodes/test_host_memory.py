"""The reading of system memory honours a container's cgroup limit (v2 and v1), on fake cgroup trees
(vae_core.memory, which the core's planner and the nodes' RAM guard share); and the guard takes the
smaller of MemAvailable and what the cgroup leaves."""
from __future__ import annotations

MiB = 2 ** 20


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_minus_usage_less_droppable_cache(pack, tmp_path):
    mem = pack.vae_core.memory
    root = tmp_path / "cgroup"
    _write(root / "kube" / "pod" / "memory.max", str(1024 * MiB))
    _write(root / "kube" / "pod" / "memory.current", str(600 * MiB))
    _write(root / "kube" / "pod" / "memory.stat", f"anon 1\ninactive_file {100 * MiB}\nactive_file 5\n")
    _write(root / "kube" / "memory.max", "max")  # the parent sets no limit
    _write(root / "kube" / "memory.current", str(5000 * MiB))
    membership = tmp_path / "self_cgroup"
    membership.write_text("0::/kube/pod\n")
    # 1024 MiB limit, 600 MiB charged of which 100 MiB is page cache the kernel drops first
    assert mem.cgroup_available(str(root), str(membership)) == 524 * MiB


def test_cgroup_v1_memory_controller_and_the_tightest_ancestor(pack, tmp_path):
    memory = pack.vae_core.memory
    mem = tmp_path / "cgroup" / "memory"
    _write(mem / "a" / "b" / "memory.limit_in_bytes", str(2 ** 63 - 4096))  # v1's "no limit"
    _write(mem / "a" / "b" / "memory.usage_in_bytes", str(300 * MiB))
    _write(mem / "a" / "memory.limit_in_bytes", str(800 * MiB))
    _write(mem / "a" / "memory.usage_in_bytes", str(500 * MiB))
    membership = tmp_path / "self_cgroup"
    membership.write_text("5:cpu,cpuacct:/a\n4:memory:/a/b\n0::/\n")
    assert memory.cgroup_available(str(tmp_path / "cgroup"), str(membership)) == 300 * MiB


def test_no_cgroup_limit_means_no_bound(pack, tmp_path):
    mem = pack.vae_core.memory
    _write(tmp_path / "cgroup" / "memory.max", "max")
    _write(tmp_path / "cgroup" / "memory.current", "123")
    membership = tmp_path / "self_cgroup"
    membership.write_text("0::/\n")
    assert mem.cgroup_available(str(tmp_path / "cgroup"), str(membership)) is None
    assert mem.cgroup_available(str(tmp_path / "absent"), str(tmp_path / "absent_file")) is None


def test_available_ram_is_the_smaller_of_meminfo_and_the_cgroup(pack, monkeypatch):
    hm, mem = pack.nodes.host_memory, pack.vae_core.memory
    monkeypatch.setattr(mem, "_meminfo_available", lambda: 8 * 1024 * MiB)
    monkeypatch.setattr(mem, "cgroup_available", lambda: 512 * MiB)
    assert hm.available_ram() == 512 * MiB
    assert pack.nodes.run.available_ram() == 512 * MiB  # the guard in run.py asks host_memory
    assert mem.free_memory("cpu") == 512 * MiB  # and so does the core's planner
    monkeypatch.setattr(mem, "cgroup_available", lambda: None)
    assert hm.available_ram() == 8 * 1024 * MiB
