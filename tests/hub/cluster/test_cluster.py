"""Cluster backends: the real kubernetes client against the fake API server, and the static file."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hub.cluster.base import (
    ClusterError,
    LabelPreconditionFailed,
    NodeEvent,
    StaticCluster,
    load_inventory,
    write_inventory,
)
from hub.cluster.kubernetes import KubernetesCluster, load_api_client
from hub.cluster.selectors import parse_selector
from hub.config import ClusterSettings
from hub.server.control import make_cluster
from tests.support.fake_k8s import FakeKube
from tests.support.waiting import until

CAM = "edge.ai/camera-node"
DET = "edge.ai/model.det"


@pytest.fixture
def fake_kube() -> Iterator[FakeKube]:
    k = FakeKube(hang_s=20).start()
    for i in range(4):
        k.add_node(f"n{i}", {CAM: "true", "site": "a" if i < 3 else "b", "line": str(i % 2)})
    k.add_node("master", {"node-role.kubernetes.io/control-plane": ""})
    yield k
    k.stop()


@pytest.fixture
def events() -> list[NodeEvent]:
    """Every batch of node events ``kcluster`` reported, flattened."""
    return []


@pytest.fixture
async def kcluster(fake_kube: FakeKube, tmp_path: Path,
                   events: list[NodeEvent]) -> AsyncIterator[KubernetesCluster]:
    s = ClusterSettings(backend="kubernetes",
                        kubeconfig=fake_kube.write_kubeconfig(tmp_path / "kubeconfig"),
                        api_timeout_s=0.5, api_backoff_s=0.01, api_backoff_max_s=0.05,
                        api_retries=4, watch_timeout_s=5)
    c = make_cluster(s, on_change=events.extend)
    assert isinstance(c, KubernetesCluster)
    await c.start()
    yield c
    await c.aclose()


async def test_k8s_lists_camera_nodes_and_selects(kcluster: KubernetesCluster) -> None:
    assert sorted(kcluster.nodes()) == ["n0", "n1", "n2", "n3"]  # master has no camera label
    sel = parse_selector("site=a,line in (1)")
    assert [n.name for n in kcluster.select(sel)] == ["n1"]
    fresh = await kcluster.list_nodes(parse_selector("site notin (a)"))
    assert [n.name for n in fresh] == ["n3"]


async def test_k8s_watch_picks_up_kubectl_label(kcluster: KubernetesCluster,
                                                fake_kube: FakeKube,
                                                events: list[NodeEvent]) -> None:
    # the initial list is reported too, as one upsert per camera node
    assert sorted(e.node.name for e in events if e.kind == "upsert") == ["n0", "n1", "n2", "n3"]
    n = len(events)
    fake_kube.label("n2", DET, "v7")
    await until(lambda: kcluster.nodes()["n2"].labels.get(DET) == "v7")
    assert [(e.kind, e.node.name) for e in events[n:]] == [("upsert", "n2")]
    # a status heartbeat changes no label: no event
    n = len(events)
    fake_kube.touch("n1")
    fake_kube.label("n0", "x", "1")
    await until(lambda: kcluster.nodes()["n0"].labels.get("x") == "1")
    assert [e.node.name for e in events[n:]] == ["n0"]
    # leaving the camera-node selector is a delete; joining is an upsert
    fake_kube.label("n3", CAM, None)
    await until(lambda: "n3" not in kcluster.nodes())
    fake_kube.add_node("n9", {CAM: "true"})
    await until(lambda: "n9" in kcluster.nodes())


async def test_k8s_watch_relists_after_410(kcluster: KubernetesCluster,
                                           fake_kube: FakeKube) -> None:
    fake_kube.compact()
    fake_kube.inject("GET", 500, times=1)  # the relist itself fails once
    fake_kube.label("n1", DET, "v2")
    await until(lambda: kcluster.nodes()["n1"].labels.get(DET) == "v2")


async def test_k8s_stale_events_never_undo_a_patch(kcluster: KubernetesCluster,
                                                   fake_kube: FakeKube,
                                                   events: list[NodeEvent]) -> None:
    before = kcluster.nodes()["n0"]
    n = len(events)
    node = await kcluster.patch_labels("n0", {DET: "v2"})
    # a watch event from before the patch arrives late: ignored
    kcluster.observe([before])
    assert kcluster.nodes()["n0"] == node and kcluster.nodes()["n0"].labels[DET] == "v2"
    assert [e.node.labels.get(DET) for e in events[n:]] == ["v2"]


async def test_k8s_patch_applies_once(kcluster: KubernetesCluster, fake_kube: FakeKube) -> None:
    node = await kcluster.patch_labels("n0", {DET: "v1"})
    assert node.labels[DET] == "v1"
    assert fake_kube.labels("n0")[DET] == "v1"
    # already there: no request at all
    before = fake_kube.count("PATCH")
    await kcluster.patch_labels("n0", {DET: "v1"})
    assert fake_kube.count("PATCH") == before
    # removal
    await kcluster.patch_labels("n0", {DET: None})
    assert DET not in fake_kube.labels("n0")


@pytest.mark.parametrize("status", [409, 429, 500, 503])
async def test_k8s_patch_retries_temporary_errors(kcluster: KubernetesCluster,
                                                  fake_kube: FakeKube, status: int) -> None:
    fake_kube.inject("PATCH", status, times=2, node="n1", retry_after=0.01)
    node = await kcluster.patch_labels("n1", {DET: "v3"})
    assert node.labels[DET] == "v3"
    assert fake_kube.count("PATCH", "n1") == 3
    assert fake_kube.effective_patches["n1"] == 1


async def test_k8s_hanging_patch_is_not_applied_twice(kcluster: KubernetesCluster,
                                                      fake_kube: FakeKube) -> None:
    # the server applies the patch, then never answers: the client times out, re-reads the
    # node, sees the label there and sends nothing more
    fake_kube.inject("PATCH", hang=True, node="n2")
    t0 = time.monotonic()
    node = await kcluster.patch_labels("n2", {DET: "v4"})
    assert node.labels[DET] == "v4"
    assert time.monotonic() - t0 < 5
    assert fake_kube.count("PATCH", "n2") == 1
    assert fake_kube.effective_patches["n2"] == 1


async def test_k8s_hanging_patch_not_applied_is_retried(kcluster: KubernetesCluster,
                                                        fake_kube: FakeKube) -> None:
    fake_kube.inject("PATCH", hang=True, apply_first=False, node="n2")
    node = await kcluster.patch_labels("n2", {DET: "v5"})
    assert node.labels[DET] == "v5"
    assert fake_kube.count("PATCH", "n2") == 2
    assert fake_kube.effective_patches["n2"] == 1


async def test_k8s_gives_up_with_clear_error(kcluster: KubernetesCluster,
                                             fake_kube: FakeKube) -> None:
    fake_kube.inject("PATCH", 500, times=100, node="n3")
    with pytest.raises(ClusterError, match=r"n3.*after 5 attempts"):
        await kcluster.patch_labels("n3", {DET: "v1"})
    assert DET not in fake_kube.labels("n3")
    with pytest.raises(ClusterError, match=r"does not exist|not found"):
        await kcluster.patch_labels("nope", {DET: "v1"})
    with pytest.raises(ClusterError, match="invalid label"):
        await kcluster.patch_labels("n0", {DET: "bad value!"})


async def test_k8s_compare_and_set(kcluster: KubernetesCluster, fake_kube: FakeKube) -> None:
    await kcluster.patch_labels("n1", {DET: "v2"})
    fake_kube.label("n1", DET, "v9")  # someone else, before our cache hears of it
    with pytest.raises(LabelPreconditionFailed):
        await kcluster.patch_labels("n1", {DET: "v1"}, expect={DET: "v2"})
    assert fake_kube.labels("n1")[DET] == "v9"


async def test_k8s_patch_many_concurrently(kcluster: KubernetesCluster,
                                           fake_kube: FakeKube) -> None:
    fake_kube.inject("PATCH", 429, times=3, retry_after=0.01)
    out = await kcluster.patch_many({f"n{i}": {DET: "v2"} for i in range(4)} | {"zz": {DET: "v2"}})
    assert isinstance(out["zz"], ClusterError)
    assert all(fake_kube.labels(f"n{i}")[DET] == "v2" for i in range(4))
    assert sum(fake_kube.effective_patches.values()) == 4


def test_k8s_missing_config_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="cannot configure"):
        load_api_client(ClusterSettings(backend="kubernetes", kubeconfig=tmp_path / "none"))


# ------------------------------------------------------------------------------------- static


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    p = tmp_path / "inventory.yaml"
    write_inventory(p, {"a1": {CAM: "true", "site": "a"}, "a2": {CAM: "true", "site": "a"},
                        "gw": {"site": "a"}})
    return p


async def test_static_reads_patches_and_picks_up_edits(inventory: Path) -> None:
    seen: list[NodeEvent] = []
    c = StaticCluster(ClusterSettings(backend="static", inventory_file=inventory,
                                      inventory_poll_s=0.02), on_change=seen.extend)
    async with c:
        assert sorted(c.nodes()) == ["a1", "a2"]
        out = await c.patch_many({"a1": {DET: "v1"}, "a2": {DET: "v1"}, "zz": {DET: "v1"}})
        assert isinstance(out["zz"], ClusterError)
        assert load_inventory(inventory)["a1"][DET] == "v1"
        assert {e.node.name for e in seen} == {"a1", "a2"}
        # an edit by hand
        raw = load_inventory(inventory)
        raw["a2"][DET] = "v0"
        raw["gw"][CAM] = "true"
        write_inventory(inventory, raw)
        await until(lambda: c.nodes().get("a2") is not None
                    and c.nodes()["a2"].labels.get(DET) == "v0" and "gw" in c.nodes())
        with pytest.raises(LabelPreconditionFailed):
            await c.patch_labels("a2", {DET: None}, expect={DET: "v1"})
        # a broken edit keeps the last good view
        inventory.write_text("nodes: [ {name: BAD NAME} ]\n")  # noqa: ASYNC240
        await until(lambda: c.invalid_reads > 0)
        assert "a1" in c.nodes()


def test_static_invalid_inventory(tmp_path: Path) -> None:
    p = tmp_path / "inv.yaml"
    p.write_text("nodes:\n  - name: a\n    labels: {'bad key!': x}\n")
    with pytest.raises(ClusterError, match=r"nodes\[0\].*invalid label key"):
        load_inventory(p)
    p.write_text("nodes:\n  - name: a\n  - name: a\n")
    with pytest.raises(ClusterError, match="twice"):
        load_inventory(p)


async def test_static_without_inventory_has_no_nodes() -> None:
    async with StaticCluster(ClusterSettings(backend="static")) as c:
        assert c.nodes() == {}
        out = await c.patch_many({"a": {DET: "v1"}})
        assert isinstance(out["a"], ClusterError)
