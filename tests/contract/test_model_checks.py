"""The contract's model checks below the corpus: tasks vs units, reasons, the agent-only check."""

from __future__ import annotations

import json
import math
import pickle

import pytest

from edge_agent.contract import graph, tasks
from edge_agent.contract import manifest as manifests
from edge_agent.contract.rejection import Reason, Rejection
from edge_agent.inference import postprocess
from edge_agent.inference.postprocess.base import PostprocessUnit
from tests.contract.corpus import graph_bytes, manifest


def test_every_task_has_a_unit_with_the_contracts_schema() -> None:
    assert postprocess.tasks() == set(tasks.names())
    for name in tasks.names():
        assert postprocess.get_unit(name).params_model is tasks.get(name).params


def test_a_unit_for_a_task_the_contract_does_not_know_is_refused() -> None:
    with pytest.raises(RuntimeError, match="segmentation"):

        class Segmentation(PostprocessUnit[tasks.ClassificationParams], task="segmentation"):
            def decode(self, outputs, meta):  # type: ignore[no-untyped-def]
                return {}

    assert "segmentation" not in postprocess.tasks()


def test_a_unit_with_another_tasks_params_is_refused() -> None:
    with pytest.raises(RuntimeError, match="params must be the contract's"):

        class Yolo2(PostprocessUnit[tasks.ClassificationParams], task="yolo"):
            def decode(self, outputs, meta):  # type: ignore[no-untyped-def]
                return {}

    assert postprocess.get_unit("yolo").params_model is tasks.YoloParams


def test_a_rejection_keeps_its_fields_across_pickling() -> None:
    r = Rejection(Reason.INPUT_TYPE, "model input type tensor(int8) is not tensor(float)",
                  source="/m/manifest.json")
    back = pickle.loads(pickle.dumps(r))
    assert (back.reason, back.message, back.source, str(back)) == (
        r.reason, r.message, r.source, "/m/manifest.json: " + r.message)
    assert str(Reason.INPUT_TYPE) == "input_type"


def _parse(**over: object) -> manifests.ModelManifest:
    return manifests.parse_json(json.dumps(manifest("m", graph_bytes(), **over)))


@pytest.mark.parametrize(
    ("over", "reason", "message"),
    [
        ({"task": "seg"}, Reason.UNKNOWN_TASK,
         "invalid manifest: task: unknown task 'seg'; known tasks: centerface, classification, "
         "yolo"),
        ({"postprocess": {"top_k": 0}}, Reason.POSTPROCESS_PARAMS,
         "invalid manifest: postprocess.top_k: Input should be greater than or equal to 1"),
        ({"postprocess": {"min_score": math.inf}}, Reason.POSTPROCESS_PARAMS,
         "invalid manifest: postprocess.min_score: Input should be a finite number"),
        ({"labels": ["a"]}, Reason.TASK_OUTPUTS,
         "invalid manifest: 1 labels for a classifier with 3 classes (output 'logits' has "
         "shape ['N', 3])"),
        ({"colour": 1, "sha256": "x"}, Reason.INVALID_FIELD,
         "invalid manifest: sha256: Value error, must be 64 lowercase hex digits (and 1 more)"),
    ],
)
def test_reasons_and_messages(over: dict[str, object], reason: Reason, message: str) -> None:
    with pytest.raises(Rejection) as exc:
        _parse(**over)
    assert (exc.value.reason, exc.value.message) == (reason, message)


def test_the_warm_up_check_sees_what_the_graph_does_not_declare() -> None:
    # the graph may declare the class axis symbolic; the real output then decides
    m = _parse(outputs=[{"name": "logits", "shape": ["N", "C"]}])
    graph.check_output_arrays(m, [(1, 3)])
    with pytest.raises(Rejection) as exc:
        graph.check_output_arrays(m, [(1, 5)])
    assert exc.value.reason is Reason.TASK_OUTPUTS
    with pytest.raises(Rejection) as exc:
        graph.check_output_arrays(_parse(), [(1, 3, 1)])
    assert exc.value.reason is Reason.OUTPUT_SHAPE


def test_a_checked_graph_reports_its_signature() -> None:
    data = graph_bytes()
    sig = graph.check_model(data, _parse())
    assert sig.inputs == (graph.Tensor("images", "tensor(float)", ("N", 3, 32, 32)),)
    assert [o.name for o in sig.outputs] == ["logits"]
