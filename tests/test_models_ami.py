"""AmiModel on crafted inputs: real architectures, weights written by the test, loaded from disk.

The moth filter and the species model are crafted so their answers are known: the filter calls
dark crops "moth" and light ones "nonmoth" (decision on mean intensity), the species model names
a dark crop's dominant colour. Known boxes on a painted image must then come back with exactly
those labels, non-moths with only the filter's classification (terminal=false), as upstream.
The detector has random weights with a head biased to accept every proposal, so the end-to-end
run has a known number of boxes per image.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from antenna_flows import results_codec
from antenna_flows.models import fakes
from antenna_flows.models.ami import AmiModel
from antenna_flows.models.base import ImageInput, UnknownPipeline, warmup_frame
from antenna_flows.models.crops import crop_and_resize, stack_images
from antenna_flows.models.engine import resolve_device
from antenna_flows.models.nets import build_classifier, build_detector, fold_batchnorm
from antenna_flows.models.registry import PIPELINES, PipelineSpec
from antenna_flows.models.weights import MissingWeights, load_state_dict
from antenna_flows.schemas import PipelineProcessingTask, PipelineResultsResponse
from antenna_flows.settings import WorkerSettings

COLOURS = ["Red", "Green", "Blue"]
DETECTIONS_PER_IMAGE = 3
BACKGROUND = (200, 200, 200)
# name -> (fill, box): three dark moths of different colours and one light non-moth.
PAINT = {
    "Red": ((90, 10, 10), (10, 10, 60, 50)),
    "Green": ((10, 90, 10), (80, 20, 131, 71)),
    "Blue": ((10, 10, 90), (150, 100, 221, 171)),
    "light": ((235, 235, 235), (20, 120, 71, 171)),
}


def _small(spec: PipelineSpec) -> PipelineSpec:
    """Production specs with a small detector input and few boxes, so a CPU run takes a second."""
    detector = dataclasses.replace(spec.detector, min_size=96, max_size=128, max_detections=DETECTIONS_PER_IMAGE)
    return dataclasses.replace(spec, detector=detector)


PIPES = {slug: _small(PIPELINES[slug]) for slug in
         ("panama_moths_2024", "costa_rica_moths_turing_2024", "moth_binary", "insect_orders_2025")}


def colour_resnet(model: nn.Module, head: torch.Tensor) -> nn.Module:
    """Make a (torchvision or timm) ResNet-50 compute ``head @ mean normalised RGB`` of its input.

    The stem writes +mean and -mean of each channel into channels 0-5; every residual branch
    is zeroed and each downsample shortcut passes channels 0-5 through, so the pooled features
    are those six numbers (after ReLU) and the fc sees the crop's mean colour.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1), m.bias.zero_(), m.running_mean.zero_(), m.running_var.fill_(1)
        for c in range(3):
            model.conv1.weight[c, c] = 1 / 49
            model.conv1.weight[3 + c, c] = -1 / 49
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for c in range(6):
                layer[0].downsample[0].weight[c, c] = 1
        model.fc.weight.zero_(), model.fc.bias.zero_()
        model.fc.weight[:, :3] = head
        model.fc.weight[:, 3:6] = -head
    return model


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    panama = PIPES["panama_moths_2024"]
    detector = build_detector(panama.detector)
    with torch.no_grad():  # every proposal scores softmax([0, 4])[1] = 0.98 > 0.8
        detector.roi_heads.box_predictor.cls_score.weight.zero_()
        detector.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([0.0, 4.0]))
    fakes.write_weights(panama.detector, root, detector)

    binary = panama.binary
    moth_first = torch.tensor([[-10 / 3] * 3, [10 / 3] * 3])  # dark -> moth (index 0), light -> nonmoth
    fakes.write_label_map(binary, root, ["moth", "nonmoth"])
    fakes.write_weights(binary, root, colour_resnet(build_classifier(binary, 2), moth_first))

    species = panama.classifier
    dominant = 10 * (torch.eye(3) - 1 / 3)  # logit_j = 10 * (x_j - mean x)
    fakes.write_label_map(species, root, [f"Species {c}" for c in COLOURS])
    fakes.write_weights(species, root, colour_resnet(build_classifier(species, 3), dominant))

    fakes.write_random_model(PIPES["costa_rica_moths_turing_2024"].classifier, root, num_classes=5)
    fakes.write_random_model(PIPES["insect_orders_2025"].classifier, root, num_classes=4)
    return root


@pytest.fixture(scope="module")
def model(weights_dir: Path) -> AmiModel:
    m = AmiModel(weights_dir, device="cpu", pipelines=PIPES, max_loaded_pipelines=3)
    yield m
    m.close()


def _input(i: int, image: Image.Image) -> ImageInput:
    return ImageInput(PipelineProcessingTask(id=str(i), image_id=str(i), image_url=f"http://images/{i}.jpg"), image)


def painted(size: tuple[int, int] = (240, 190)) -> Image.Image:
    image = Image.new("RGB", size, BACKGROUND)
    for fill, box in PAINT.values():
        image.paste(fill, box)
    return image


def _valid(results: list[PipelineResultsResponse]) -> None:
    """Valid against the schema, both as pydantic writes it and as results_codec does."""
    for r in results:
        as_json = r.model_dump(mode="json")
        assert PipelineResultsResponse.model_validate(as_json).model_dump(mode="json") == as_json
        PipelineResultsResponse.model_validate_json(results_codec.dumps(r))


def test_known_boxes_give_known_labels_and_filter_splits_as_upstream(model: AmiModel) -> None:
    boxes = [box for _, box in PAINT.values()]
    [result] = model.predict_boxes("panama_moths_2024", [_input(7, painted())], [boxes])
    _valid([result])
    assert [s.id for s in result.source_images] == ["7"] and result.pipeline == "panama_moths_2024"
    assert [tuple(d.bbox.model_dump().values()) for d in result.detections] == [tuple(map(float, b)) for b in boxes]
    by_name = dict(zip(PAINT, result.detections))
    for colour in COLOURS:
        binary, species = by_name[colour].classifications
        assert (binary.classification, binary.terminal, binary.algorithm.key) == ("moth", False, "moth_nonmoth_classifier")
        assert (species.classification, species.terminal) == (f"Species {colour}", True)
        assert species.algorithm.key == "panama_species_classifier_apr_2024"
        assert len(species.scores) == len(species.logits) == 3 and species.labels is None
        assert sum(species.scores) == pytest.approx(1.0, abs=1e-5)
    [only] = by_name["light"].classifications  # non-moths stop after the filter
    assert (only.classification, only.terminal) == ("nonmoth", False)
    assert model.last_counts == {"images": 1, "detections": 4, "classified": 3, "dropped": 0}


def test_crops_are_preprocessed_as_upstream(model: AmiModel, weights_dir: Path) -> None:
    """Logits equal upstream's transform (ToTensor, Resize(128, antialias), ImageNet Normalize)
    applied to the PIL crop and fed to the unfolded model loaded from the same file."""
    image = Image.frombytes("RGB", (160, 120), torch.randint(0, 256, (120, 160, 3), dtype=torch.uint8).numpy().tobytes())
    boxes = [(3, 4, 50, 90), (60, 10, 157, 40), (100, 70, 110, 75)]  # down- and upscaled crops
    [result] = model.predict_boxes("moth_binary", [_input(0, image)], [boxes])
    spec = PIPES["moth_binary"].classifier
    reference = build_classifier(spec, 2).eval()
    reference.load_state_dict(load_state_dict(weights_dir / spec.weights.filename))
    upstream = transforms.Compose([transforms.ToTensor(), transforms.Resize((128, 128), antialias=True),
                                   transforms.Normalize(spec.mean, spec.std)])
    with torch.no_grad():
        expected = reference(torch.stack([upstream(image.crop(b)) for b in boxes]))
    got = torch.stack([torch.as_tensor(d.classifications[0].logits) for d in result.detections])
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)


def test_batched_crop_resize_equals_per_crop_interpolate() -> None:
    torch.manual_seed(1)
    images = [torch.randint(0, 256, (90, 130, 3), dtype=torch.uint8), torch.randint(0, 256, (140, 70, 3), dtype=torch.uint8)]
    batch = stack_images(images)
    boxes = torch.tensor([[0, 0, 130, 90], [5, 7, 9, 8], [10, 20, 60, 139], [1, 1, 2, 2], [30, 3, 128, 40]])
    index = torch.tensor([0, 0, 1, 1, 0])
    args = (batch, index, boxes, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.testing.assert_close(crop_and_resize(*args, batched=True), crop_and_resize(*args, batched=False), atol=1e-4, rtol=1e-5)


def test_fold_batchnorm_is_exact() -> None:
    torch.manual_seed(2)
    net = build_classifier(PIPES["panama_moths_2024"].classifier, 5).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
        x = torch.rand(2, 3, 64, 64)
        before = net(x)
        after = fold_batchnorm(net)(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_end_to_end_through_the_detector_with_mixed_sizes(model: AmiModel) -> None:
    images = [_input(1, painted((160, 120))), _input(2, painted((120, 170))), _input(3, painted((200, 150)))]
    results = model.predict("panama_moths_2024", images)
    _valid(results)
    assert [r.source_images[0].id for r in results] == ["1", "2", "3"]
    for item, result in zip(images, results):
        width, height = item.image.size
        assert len(result.detections) == DETECTIONS_PER_IMAGE and result.total_time > 0
        for d in result.detections:
            assert d.source_image_id == item.task.image_id and d.algorithm.key == "fasterrcnn_for_ami_moth_traps_2023"
            assert 0 <= d.bbox.x1 < d.bbox.x2 <= width and 0 <= d.bbox.y1 < d.bbox.y2 <= height
            assert all(float(v).is_integer() for v in d.bbox.model_dump().values())  # upstream truncates
            binary = d.classifications[0]
            assert binary.terminal is False and binary.inference_time is not None
            assert len(d.classifications) == (2 if binary.classification == "moth" else 1)
    assert set(model.last_timings) == {"prepare", "detect", "crop", "binary", "classify", "results", "total"}
    assert model.last_timings["detect"] > 0 and model.last_counts["detections"] == 3 * DETECTIONS_PER_IMAGE


def test_tensor_inputs_match_pil_inputs(model: AmiModel) -> None:
    image = painted((160, 120))
    boxes = [[box for _, box in PAINT.values()]]
    from_pil = model.predict("panama_moths_2024", [_input(0, image)])
    from_tensor = model.predict("panama_moths_2024", [_input(0, model.prepare(image))])
    assert from_pil[0].detections
    assert _without(from_pil, {"timestamp", "inference_time", "total_time"}) == \
        _without(from_tensor, {"timestamp", "inference_time", "total_time"})
    assert model.predict_boxes("moth_binary", [_input(0, model.prepare(image))], boxes)[0].detections
    with pytest.raises(ValueError, match="expected a"):
        model.predict("moth_binary", [_input(0, torch.zeros(120, 160, 3, dtype=torch.uint8))])


def _without(results: list[PipelineResultsResponse], keys: set[str]) -> list[dict]:
    def scrub(value: object) -> object:
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items() if k not in keys}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return [scrub(r.model_dump(mode="json")) for r in results]


def test_pipelines_without_filter_classify_every_detection(model: AmiModel) -> None:
    boxes = [[box for _, box in PAINT.values()]]
    [binary_only] = model.predict_boxes("moth_binary", [_input(0, painted())], boxes)
    assert [[(c.classification, c.terminal) for c in d.classifications] for d in binary_only.detections] == [
        [("moth", True)]] * 3 + [[("nonmoth", True)]]
    [orders] = model.predict_boxes("insect_orders_2025", [_input(0, painted())], boxes)
    _valid([orders])
    for d in orders.detections:
        [c] = d.classifications
        assert c.terminal and c.algorithm.key == "insect_order_classifier" and len(c.scores) == 4


def test_turing_pipeline_uses_its_own_crops(model: AmiModel) -> None:
    """300 px / mean-std 0.5 crops for the species stage, 128 px ImageNet ones for the filter."""
    [result] = model.predict_boxes("costa_rica_moths_turing_2024", [_input(0, painted())], [[PAINT["Red"][1], PAINT["light"][1]]])
    moth, light = result.detections
    assert [c.algorithm.key for c in moth.classifications] == ["moth_nonmoth_classifier", "turing_costa_rica_species_classifier"]
    assert len(moth.classifications[1].scores) == 5 and len(light.classifications) == 1


def test_degenerate_boxes_are_dropped_not_fatal(model: AmiModel) -> None:
    boxes = [[(10, 10, 10, 50), (-20, -20, -1, -1), (500, 5, 600, 50), PAINT["Red"][1]], []]
    results = model.predict_boxes("panama_moths_2024", [_input(0, painted()), _input(1, painted())], boxes)
    assert [len(r.detections) for r in results] == [1, 0]
    assert model.last_counts["dropped"] == 3
    assert [c.classification for c in results[0].detections[0].classifications] == ["moth", "Species Red"]


def test_lru_keeps_shared_models(weights_dir: Path) -> None:
    m = AmiModel(weights_dir, device="cpu", pipelines=PIPES, max_loaded_pipelines=1)
    m.load("panama_moths_2024")
    m.load("panama_moths_2024")  # idempotent
    detector = next(iter(m._detectors.values()))
    m.load("costa_rica_moths_turing_2024")
    loaded = set(m._classifiers)
    assert loaded == {PIPES["panama_moths_2024"].binary.weights.filename,
                      PIPES["costa_rica_moths_turing_2024"].classifier.weights.filename}
    assert next(iter(m._detectors.values())) is detector and len(m._detectors) == 1
    with pytest.raises(UnknownPipeline):
        m.load("no_such_pipeline")
    m.close()


def test_missing_weights_name_the_file_and_the_fix(tmp_path: Path) -> None:
    m = AmiModel(tmp_path, device="cpu")
    with pytest.raises(MissingWeights, match=r"(?s)FasterRCNN.*: fasterrcnn_resnet50_fpn_tz53qv9v\.pt is not in.*curl .*https://.*AMI_ALLOW_WEIGHT_DOWNLOAD"):
        m.load("panama_moths_2024")


def test_from_settings_and_devices(tmp_path: Path) -> None:
    settings = WorkerSettings(weights_dir=tmp_path, device="cpu", inference_precision="bf16", max_loaded_pipelines=2)
    m = AmiModel.from_settings(settings)
    assert m.kind == "ami" and m.pipelines() == list(PIPELINES) and m.max_loaded_pipelines == 2
    assert m.device == torch.device("cpu") and m.engine.precision == "fp32"  # no autocast on CPU
    assert m.predict("moth_binary", []) == []
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError):
        resolve_device("tpu")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_is_stable_over_many_batches(model: AmiModel) -> None:
    images = [_input(i, painted((150 + 10 * i, 110))) for i in range(2)]
    for _ in range(2):
        model.predict("moth_binary", images)
    start = _rss_mb()
    for _ in range(10):
        model.predict("moth_binary", images)
    print(f"RSS {start:.0f} -> {_rss_mb():.0f} MB")
    assert _rss_mb() - start < 30, f"RSS grew from {start:.0f} MB to {_rss_mb():.0f} MB"


# --- the fast configuration against the fp32 reference ----------------------------------------

# Measured here (3 frames, 24 detections): top-1 agreement 1.0 for both classifiers, largest
# softmax difference 0.024 (species, bf16) and 3e-11 (moth filter); boxes identical.
TOLERANCE = {"box_px": 2, "score_margin": 0.02, "top1": 0.99, "max_score_diff": 0.05}


def _randomize_batchnorm(net: nn.Module) -> nn.Module:
    """Random BN statistics and affine weights (timm zero-inits the last BN of each block, which
    would leave the residual branches dead), so a random net's outputs depend on its input."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return net


def _unfolded(spec, num_classes: int, path: Path) -> nn.Module:
    net = build_classifier(spec, num_classes).eval()
    net.load_state_dict(load_state_dict(path))
    return net


def test_fast_configuration_matches_the_fp32_reference(tmp_path: Path) -> None:
    """The GPU's fast configuration, run on the CPU, against upstream's fp32 pipeline (unfolded
    models, the whole image to the detector, each PIL crop through ToTensor, Resize(antialias) and
    Normalize), with random weights of the real architectures on trap-like frames.

    Fast: BatchNorm folded, channels-last, crops resized by the batched matmul path (CUDA's), and
    the classifiers under bf16 autocast (CUDA's default precision). Tolerance (TOLERANCE): every
    reference detection scoring above threshold + 0.02 is found (each coordinate within 2 px) and
    every fast one is in the reference (scoring above threshold - 0.02); on the fast path's crops,
    top-1 agreement >= 99% for the moth filter and the species model, softmax scores within 0.05.

    The detector runs fp32 here: a Faster R-CNN with random weights is chaotic under bf16 (its
    proposals and box deltas have no trained structure; measured on these frames: 7 of 57 boxes
    matched at IoU 0.9 under bf16, 57 of 57 folded in fp32), so its bf16 check needs the real
    weights on a GPU (lab/antenna_lab/bench/gpu_bench.py).
    """
    slug = "panama_moths_2024"
    base = PIPELINES[slug]
    spec = dataclasses.replace(base, detector=dataclasses.replace(base.detector, min_size=240, max_size=320, max_detections=100))
    torch.manual_seed(5)
    detector = build_detector(spec.detector)
    with torch.no_grad():  # random scores spread around the threshold (0.75-0.93 on these frames)
        detector.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([0.0, 1.5]))
    fakes.write_weights(spec.detector, tmp_path, detector)
    fakes.write_label_map(spec.binary, tmp_path, ["moth", "nonmoth"])
    fakes.write_weights(spec.binary, tmp_path, _randomize_batchnorm(build_classifier(spec.binary, 2)))
    species_labels = [f"Species {i}" for i in range(636)]
    fakes.write_label_map(spec.classifier, tmp_path, species_labels)
    fakes.write_weights(spec.classifier, tmp_path, _randomize_batchnorm(build_classifier(spec.classifier, 636)))

    fast = AmiModel(tmp_path, device="cpu", pipelines={slug: spec})
    fast.engine.batched_crops = True  # what CUDA runs
    fast.load(slug)  # the detector in fp32 (see the docstring), then the classifiers again in bf16
    fast.engine.dtype = torch.bfloat16
    fast._classifiers.clear()
    fast.load(slug)
    frames = [warmup_frame(320, 240, seed) for seed in range(3)]
    results = fast.predict(slug, [_input(i, f) for i, f in enumerate(frames)])
    _valid(results)

    threshold, margin, px = spec.detector.score_threshold, TOLERANCE["score_margin"], TOLERANCE["box_px"]
    reference = build_detector(spec.detector).eval()
    reference.load_state_dict(load_state_dict(tmp_path / spec.detector.weights.filename))
    reference.roi_heads.score_thresh = threshold - margin
    with torch.no_grad():
        expected = reference([transforms.functional.to_tensor(f) for f in frames])
    for result, out in zip(results, expected):
        got = torch.tensor([[d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2] for d in result.detections]).reshape(-1, 4)
        boxes = out["boxes"].to(torch.int64).float()
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # upstream skips empty crops
        boxes, scores = boxes[nonempty], out["scores"][nonempty]
        for box, score in zip(boxes, scores):  # every clear reference detection is there
            if score > threshold + margin:
                assert ((got - box).abs().max(1).values <= px).any(), f"missed {box.tolist()} ({score:.3f})"
        for box in got:  # and nothing the reference would not (nearly) keep
            distance = (boxes - box).abs().max(1).values
            assert (distance <= px).any(), f"extra {box.tolist()}, nearest {boxes[distance.argmin()].tolist()} " \
                f"({scores[distance.argmin()]:.3f}); reference: {len(boxes)} boxes, fast: {len(got)}"

    upstream = {s.key: transforms.Compose([transforms.ToTensor(), transforms.Resize((s.input_size,) * 2, antialias=True),
                                           transforms.Normalize(s.mean, s.std)]) for s in (spec.binary, spec.classifier)}
    nets = {spec.binary.key: _unfolded(spec.binary, 2, tmp_path / spec.binary.weights.filename),
            spec.classifier.key: _unfolded(spec.classifier, 636, tmp_path / spec.classifier.weights.filename)}
    pairs: dict[str, list[tuple[np.ndarray, torch.Tensor]]] = {k: [] for k in nets}
    for frame, result in zip(frames, results):
        for d in result.detections:
            crop = frame.crop((int(d.bbox.x1), int(d.bbox.y1), int(d.bbox.x2), int(d.bbox.y2)))
            for c in d.classifications:
                pairs[c.algorithm.key].append((np.asarray(c.scores), upstream[c.algorithm.key](crop)))
    detections = sum(len(r.detections) for r in results)
    assert detections >= 20 and len(pairs[spec.classifier.key]) >= 5, "too few crops to measure agreement"
    report = {"detections": detections}
    for key, items in pairs.items():
        got = np.stack([g for g, _ in items])
        with torch.no_grad():
            want = torch.softmax(nets[key](torch.stack([x for _, x in items])), 1).numpy()
        agreement = float((got.argmax(1) == want.argmax(1)).mean())
        worst = float(np.abs(got - want).max())
        report[key] = {"crops": len(items), "top1_agreement": agreement, "max_score_diff": worst}
        assert agreement >= TOLERANCE["top1"] and worst <= TOLERANCE["max_score_diff"], report
    print("fast (folded, channels-last, batched crops, bf16 classifiers) vs fp32 reference:", report)
