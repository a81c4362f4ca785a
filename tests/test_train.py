import numpy as np
import pytest
import torch

from selbench.configs import ScaleConfig
from selbench.errors import ConfigError
from selbench.train import _batch_indices, build_model, planned_samples_seen, random_resized_crop

SCALE = ScaleConfig(
    name="t",
    model="selbench-tiny",
    batch_size=4,
    epochs=3,
    lr=1e-3,
    weight_decay=0.1,
    warmup_fraction=0.1,
)


def test_fixed_compute_sees_the_pool_size_times_epochs_whatever_the_subset():
    assert planned_samples_seen(SCALE, "fixed-compute", 1000, 250) == 3000
    assert planned_samples_seen(SCALE, "fixed-compute", 1000, 1000) == 3000


def test_fixed_epochs_sees_the_subset_size_times_epochs():
    assert planned_samples_seen(SCALE, "fixed-epochs", 1000, 250) == 750


def test_unknown_protocol_is_named():
    with pytest.raises(ConfigError, match="fixed-epochs"):
        planned_samples_seen(SCALE, "fixed-time", 10, 5)


def test_every_epoch_visits_each_sample_once():
    batches = np.concatenate(list(_batch_indices(10, 5, 6, seed=0)))
    for epoch in range(3):
        assert sorted(batches[epoch * 10 : (epoch + 1) * 10].tolist()) == list(range(10))
    again = np.concatenate(list(_batch_indices(10, 5, 6, seed=0)))
    assert (batches == again).all()


def test_crops_keep_the_image_shape_and_follow_the_seed():
    images = torch.randn(3, 3, 8, 8)
    a = random_resized_crop(images, (0.5, 0.6), torch.Generator().manual_seed(1))
    b = random_resized_crop(images, (0.5, 0.6), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, images)


def test_model_is_built_from_the_json_config_and_seeded():
    model_a, preprocess, tokenizer = build_model("selbench-tiny", seed=1)
    model_b, _, _ = build_model("selbench-tiny", seed=1)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert tokenizer(["a red circle"]).shape == (1, 24)  # context length from the JSON


def test_unknown_architecture_is_named():
    with pytest.raises(ConfigError, match="no-such-arch"):
        build_model("no-such-arch", seed=0)


def test_building_a_model_does_not_warn_that_it_has_no_pretrained_weights(caplog):
    # open_clip logs this on the root logger for every randomly initialised model; random
    # initialisation is what selbench asks for, so the notice must not reach the user.
    import logging

    caplog.set_level(logging.WARNING)
    build_model("selbench-tiny", seed=0)
    assert not [r for r in caplog.records if "pretrained" in r.getMessage()]
    logging.getLogger().warning("other warnings still get through")
    assert [r.getMessage() for r in caplog.records] == ["other warnings still get through"]
