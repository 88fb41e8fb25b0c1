"""The wire schemas' own logic (antenna_flows/schemas.py): the full job list's rows read into
JobListItem, a result told apart as a success or an error, numpy arrays in results, task
bodies taken leniently and requests strictly."""

from __future__ import annotations

import copy
import datetime as dt

import numpy as np
import pytest
from pydantic import ValidationError

from antenna_flows.schemas import (
    AlgorithmReference,
    ClassificationResponse,
    JobListItem,
    JobListResponse,
    PipelineProcessingTask,
    PipelineResultsError,
    PipelineResultsResponse,
    TaskResult,
    TasksRequest,
)
from tests.helpers import REAL_ANTENNA_JOB_ROW

REAL_ROW = REAL_ANTENNA_JOB_ROW  # real Antenna's full-list row (tests/helpers.py)


def test_a_real_antenna_row_gives_id_pipeline_total_and_saved():
    item = JobListItem.from_full_row(REAL_ROW)
    assert (item.id, item.pipeline_slug, item.priority) == (20, "sim-quebec_vermont_moths_2023", 0)
    assert item.total == 10  # the collect stage's total_images
    assert item.saved == 10  # the results stage's progress (1.0) of the total


def _with_results_progress(fraction: object, total: object = 10) -> dict:
    row = copy.deepcopy(REAL_ROW)
    row["progress"]["stages"][0]["params"][0]["value"] = total
    row["progress"]["stages"][2]["progress"] = fraction
    return row


@pytest.mark.parametrize(("fraction", "total", "saved"), [
    (0.0, 10, 0),
    (0.3, 10, 3),
    (0.9999999, 3000, 3000),  # float noise in Antenna's fraction does not lose a save
    (1 / 3, 3000, 1000),
    (1, 7, 7),  # an int fraction
])
def test_saved_is_the_results_fraction_of_the_total(fraction, total, saved):
    item = JobListItem.from_full_row(_with_results_progress(fraction, total))
    assert (item.total, item.saved) == (total, saved)


def test_odd_progress_reads_as_unknown_never_as_an_error():
    assert JobListItem.from_full_row(_with_results_progress(0.5, "12")).total == 12  # a number as text
    garbled = JobListItem.from_full_row(_with_results_progress(0.5, "lots"))
    assert (garbled.total, garbled.saved) == (None, None)  # no total: no saved count either
    no_fraction = JobListItem.from_full_row(_with_results_progress(None))
    assert (no_fraction.total, no_fraction.saved) == (10, None)
    for progress in (None, {}, {"stages": None}, {"stages": "x"}, {"stages": [None, 3, {"key": "collect"}]}, "odd"):
        row = {**REAL_ROW, "progress": progress}
        item = JobListItem.from_full_row(row)
        assert (item.id, item.pipeline_slug, item.total, item.saved) == (20, "sim-quebec_vermont_moths_2023", None, None)


def test_a_flat_row_and_our_priority_extension():
    """The ids_only shape (pipeline_slug flat), as the local Antenna also sends its full rows."""
    item = JobListItem.from_full_row({"id": "5", "pipeline_slug": "sim-moth_binary", "priority": 3, "total": 40})
    assert (item.id, item.pipeline_slug, item.priority, item.total, item.saved) == (5, "sim-moth_binary", 3, None, None)
    assert JobListItem.from_full_row({"id": 6, "pipeline": None, "priority": None}).pipeline_slug is None
    assert JobListItem.from_full_row({"id": 6, "pipeline": None, "priority": None}).priority == 0
    with pytest.raises(KeyError):
        JobListItem.from_full_row({"pipeline": {"slug": "x"}})  # no id: the caller reports an unreadable answer


def test_the_ids_only_list_reads_rows_without_priority_as_zero():
    page = JobListResponse.model_validate({"count": 2, "next": None, "previous": None, "results": [
        {"id": 1, "pipeline_slug": "sim-a"}, {"id": 2, "pipeline_slug": None, "priority": 4, "status": "STARTED"}]})
    assert [(r.id, r.pipeline_slug, r.priority) for r in page.results] == [(1, "sim-a", 0), (2, None, 4)]


def test_a_result_is_an_error_only_when_it_names_no_pipeline():
    error = TaskResult.model_validate({"reply_subject": "r", "result": {"error": "bad image", "image_id": "9"}})
    assert isinstance(error.result, PipelineResultsError) and error.result.image_id == "9"
    success = TaskResult.model_validate({"reply_subject": "r", "result": {
        "pipeline": "sim-a", "total_time": 0.1, "source_images": [{"id": "9", "url": "u"}], "detections": [],
        "error": "ignored"}})
    assert isinstance(success.result, PipelineResultsResponse)
    with pytest.raises(ValidationError):
        TaskResult.model_validate({"reply_subject": "r", "result": {"detections": []}})  # neither


def test_numpy_scores_stay_arrays_in_python_dumps_and_become_lists_in_json():
    scores = np.array([0.25, 0.75], dtype=np.float32)
    c = ClassificationResponse.model_construct(
        classification="moth", labels=None, scores=scores, logits=None, inference_time=None,
        algorithm=AlgorithmReference(name="c", key="c"), terminal=True, timestamp=dt.datetime(2026, 1, 1))
    assert c.model_dump()["scores"] is scores  # results_codec writes the array without a float per value
    assert c.model_dump(mode="json")["scores"] == [0.25, 0.75]
    assert '"scores":[0.25,0.75]' in c.model_dump_json()
    plain = ClassificationResponse(classification="moth", scores=[0.5], algorithm={"name": "c", "key": "c"},
                                   timestamp=dt.datetime(2026, 1, 1))
    assert plain.model_dump()["scores"] == [0.5] and plain.terminal is True


def test_tasks_are_read_leniently_requests_strictly():
    task = PipelineProcessingTask.model_validate(
        {"id": "1", "image_id": "1", "image_url": "http://x/1.jpg", "reply_subject": None, "future_field": 1})
    assert task.reply_subject is None and not hasattr(task, "future_field")
    with pytest.raises(ValidationError):
        PipelineProcessingTask.model_validate({"id": "1", "image_url": "http://x/1.jpg"})  # no image_id
    assert TasksRequest.model_validate({"batch_size": 24, "client_info": {"w": 1}, "extra": 2}).batch_size == 24
    with pytest.raises(ValidationError):
        TasksRequest.model_validate({"batch_size": 0})
