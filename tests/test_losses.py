import pytest
import torch

from aria_utils.training.losses import DistillationLoss, per_sample_mse


def make_inputs(batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 4, 8, 8)
    student, teacher, target = (torch.randn(shape, generator=generator) for _ in range(3))
    features_s = [torch.randn(batch, 8, 4, 4, generator=generator) for _ in range(2)]
    features_t = [torch.randn(batch, 8, 4, 4, generator=generator) for _ in range(2)]
    return student, teacher, target, features_s, features_t


def test_each_term_matches_its_definition():
    student, teacher, target, fs, ft = make_inputs()
    paired = torch.tensor([True, True, False, False])
    out = DistillationLoss(1.0, 1.0, 1.0)(student, teacher, target, fs, ft, paired)
    assert torch.allclose(out.task, torch.nn.functional.mse_loss(student[:2], target[:2]))
    assert torch.allclose(out.kd_output, torch.nn.functional.mse_loss(student, teacher))
    expected_feat = sum(torch.nn.functional.mse_loss(s, t) for s, t in zip(fs, ft))
    assert torch.allclose(out.kd_feat, expected_feat)
    assert torch.allclose(out.loss, out.task + out.kd_output + out.kd_feat)
    assert torch.allclose(out.per_sample_kd_output, per_sample_mse(student, teacher))


def test_lambdas_scale_terms():
    student, teacher, target, fs, ft = make_inputs()
    paired = torch.ones(4, dtype=torch.bool)
    base = DistillationLoss(1.0, 1.0, 1.0)(student, teacher, target, fs, ft, paired)
    weighted = DistillationLoss(2.0, 0.5, 0.0)(student, teacher, target, fs, ft, paired)
    assert torch.allclose(weighted.loss, 2.0 * base.task + 0.5 * base.kd_output)


def test_unpaired_samples_are_excluded_from_task_loss():
    student, teacher, target, fs, ft = make_inputs()
    paired = torch.tensor([True, False, True, False])
    loss = DistillationLoss()
    before = loss(student, teacher, target, fs, ft, paired)
    changed_target = target.clone()
    changed_target[~paired] += 100.0  # the target of unpaired samples must not matter
    after = loss(student, teacher, changed_target, fs, ft, paired)
    assert torch.equal(before.task, after.task)
    changed_target[0] += 1.0  # ... while a paired sample's target does
    assert not torch.equal(loss(student, teacher, changed_target, fs, ft, paired).task, before.task)


def test_all_unpaired_batch_has_zero_task_loss():
    student, teacher, target, fs, ft = make_inputs()
    out = DistillationLoss()(student, teacher, target, fs, ft, torch.zeros(4, dtype=torch.bool))
    assert out.task.item() == 0.0 and out.kd_output.item() > 0


def test_sample_weights_reweight_kd():
    student, teacher, target, fs, ft = make_inputs()
    paired = torch.zeros(4, dtype=torch.bool)
    weights = torch.tensor([2.0, 0.0, 1.0, 1.0])
    out = DistillationLoss(0.0, 1.0, 0.0)(student, teacher, target, fs, ft, paired, weights)
    assert torch.allclose(out.kd_output, (weights * per_sample_mse(student, teacher)).mean())


def test_gradients_flow_only_to_student():
    student, teacher, target, fs, ft = make_inputs()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    DistillationLoss()(student, teacher, target, fs, ft, torch.ones(4, dtype=torch.bool)).loss.backward()
    assert student.grad is not None and teacher.grad is None


def test_task_target_follows_the_teacher_prediction_type():
    """epsilon: the noise; v_prediction: the velocity; sample (x0-prediction teachers): the clean latent."""
    from diffusers import DDPMScheduler

    from aria_utils.families.noise import DiscreteNoise

    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 990])

    def target(prediction_type):
        return DiscreteNoise(DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)).target(
            latents, noise, timesteps)

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    assert target("epsilon") is noise
    assert torch.equal(target("v_prediction"), scheduler.get_velocity(latents, noise, timesteps))
    assert target("sample") is latents
    with pytest.raises(ValueError, match="prediction type 'flow_prediction'"):
        target("flow_prediction")
