"""Samplers for the denoising loop: timesteps, input scaling, update step and noising.

Every scheduler splits into two halves:

- `plan(num_steps)` does all the bookkeeping once, in float64 numpy, from the betas of the
  training schedule: which timesteps the UNet sees, and every per-evaluation scalar the update
  needs. The result is a frozen `Plan` of float32 tables (hashed and compared by identity).
- `scale_model_input`, `step` and `add_noise` are pure `keras.ops` arithmetic that looks those
  tables up with `ops.take` at evaluation index `i`, on any Keras backend. They run eagerly, inside
  one compiled program per step, and inside one program for the whole loop where `i` is the counter
  of a `fori_loop`.

With the Stable Diffusion v1 scheduler config each scheduler reproduces the timesteps and the
updates of a diffusers class built `from_config` of it (see `SCHEDULER_NAMES`).
"""

import copy
import dataclasses
import functools

import numpy as np
from keras import ops

from kerasdiffusion.config import SCHEDULER_NAMES  # noqa: F401  (re-exported)

_PREDICTION_TYPES = ("epsilon", "v_prediction")
_BETA_SCHEDULES = ("scaled_linear", "linear")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers `scheduler_config.json` that the samplers use."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False

    def __post_init__(self):
        # A scheduler config comes from a stranger's file: every field is checked for its kind, so that a
        # wrong one is named here rather than failing as a TypeError deep in the table math.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _is_kind(value, field.type):
                raise ValueError(f"scheduler config: {field.name} must be {field.type.__name__}, got {value!r}")
        if self.num_train_timesteps < 1 or not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(f"scheduler config: need num_train_timesteps >= 1 and 0 < beta_start < beta_end < 1, "
                             f"got {self.num_train_timesteps}, {self.beta_start}, {self.beta_end}")
        if self.beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported; use one of {_BETA_SCHEDULES}")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported; use one of {_PREDICTION_TYPES}"
            )

    @classmethod
    def from_dict(cls, d):
        """Builds a config from a diffusers scheduler config dict, ignoring the keys we do not use.

        Example:
        >>> SchedulerConfig.from_dict({"_class_name": "PNDMScheduler", "prediction_type": "v_prediction"})
        SchedulerConfig(num_train_timesteps=1000, ..., prediction_type='v_prediction', ...)
        """
        if d.get("trained_betas") is not None:
            raise ValueError("Scheduler configs with explicit `trained_betas` are not supported.")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in names})


def _is_kind(value, kind):
    """Whether a config value is of a field's declared type (bool, int, float, str); an int is a float too."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))
    return isinstance(value, kind)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """What a scheduler precomputes for one run of `num_steps` steps; one table entry per UNet evaluation.

    `timesteps[i]` is the timestep fed to the UNet at evaluation `i`; `input_scale[i]` multiplies the
    sample before that evaluation; `add_noise` at `i` returns `clean_scale[i] * x0 + noise_scale[i] * noise`.
    """

    num_steps: int
    timesteps: np.ndarray
    init_noise_sigma: float
    input_scale: np.ndarray
    clean_scale: np.ndarray
    noise_scale: np.ndarray


# ----------------------------------------------------------------------------------------------
# Table math, float64 numpy.


def alphas_cumprod(config):
    """ᾱ_t = ∏_{s<=t} (1 - β_s) over the training timesteps, float64."""
    n = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
    else:
        betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def sigmas_from_alphas_cumprod(alpha_cumprod):
    """The variance-exploding noise level σ = sqrt((1 - ᾱ) / ᾱ) of x / sqrt(ᾱ) (Karras et al. 2022)."""
    return np.sqrt((1.0 - alpha_cumprod) / alpha_cumprod)


def leading_timesteps(num_steps, config):
    """Integer timesteps spaced by num_train // num_steps from 0, shifted by steps_offset, descending."""
    ratio = config.num_train_timesteps // num_steps
    timesteps = np.arange(num_steps)[::-1] * ratio + config.steps_offset
    if timesteps[0] >= config.num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} with steps_offset={config.steps_offset} reaches timestep {timesteps[0]}, "
            f"beyond the {config.num_train_timesteps} training timesteps"
        )
    return timesteps


def alphas_cumprod_at(alpha_cumprod, timesteps, config):
    """ᾱ at integer `timesteps`; a negative timestep (past the end of the chain) gets the final ᾱ,
    1 with set_alpha_to_one, else ᾱ_0."""
    final = 1.0 if config.set_alpha_to_one else alpha_cumprod[0]
    return np.where(timesteps >= 0, alpha_cumprod[np.maximum(timesteps, 0)], final)


def linspace_timesteps(num_points, last):
    """`num_points` timesteps evenly spread over [0, last], descending."""
    return np.linspace(0, last, num_points)[::-1]


def karras_sigmas(sigma_min, sigma_max, num_steps, rho=7.0):
    """Noise levels of eq. (5) of Karras et al. 2022, from sigma_max down to sigma_min."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigmas, train_sigmas):
    """Fractional training timestep whose σ is `sigmas`, interpolating linearly in log σ."""
    log_sigmas = np.log(np.maximum(sigmas, 1e-10))
    return np.interp(log_sigmas, np.log(train_sigmas), np.arange(len(train_sigmas), dtype=np.float64))


def lms_coefficients(sigmas, order=4):
    """Adams–Bashforth weights in σ: row i integrates each Lagrange basis polynomial through
    σ_i, σ_{i-1}, ... (up to `order` points) over [σ_i, σ_{i+1}]; column j weighs the derivative
    of j steps ago."""
    num_steps = len(sigmas) - 1
    coeffs = np.zeros((num_steps, order))
    for i in range(num_steps):
        nodes = sigmas[i - np.arange(min(i + 1, order))]
        for j, node in enumerate(nodes):
            basis = np.polynomial.Polynomial([1.0])
            for other in np.delete(nodes, j):
                basis *= np.polynomial.Polynomial([-other, 1.0]) / (node - other)
            antiderivative = basis.integ()
            coeffs[i, j] = antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])
    return coeffs


def _float32(**tables):
    return {name: np.asarray(value, dtype=np.float32) for name, value in tables.items()}


# ----------------------------------------------------------------------------------------------
# Backend-neutral helpers shared by the steps.


def _at(table, i):
    """table[i] as a float32 scalar tensor; `i` may be a Python int or a traced int32 tensor."""
    return ops.take(ops.convert_to_tensor(table, "float32"), i, axis=0)


def _f32(x):
    return ops.cast(x, "float32")


def _x0_and_eps_vp(model_output, sample, alpha_cumprod, prediction_type):
    """(x̂0, ε̂) from a UNet output at ᾱ for samples x_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε.

    v-prediction is v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0 (Salimans & Ho 2022, sec. 4).
    """
    a, b = ops.sqrt(alpha_cumprod), ops.sqrt(1.0 - alpha_cumprod)
    if prediction_type == "v_prediction":
        return a * sample - b * model_output, a * model_output + b * sample
    return (sample - b * model_output) / a, model_output


def _x0_ve(model_output, sample, sigma, prediction_type):
    """x̂0 from a UNet output for samples x = x0 + σ ε (the UNet saw x / sqrt(σ² + 1)).

    For v-prediction this is Karras et al. 2022's c_skip x + c_out F with c_skip = 1 / (σ² + 1),
    c_out = -σ / sqrt(σ² + 1).
    """
    if prediction_type == "v_prediction":
        return model_output * (-sigma / ops.sqrt(sigma**2 + 1.0)) + sample / (sigma**2 + 1.0)
    return sample - sigma * model_output


# ----------------------------------------------------------------------------------------------
# Schedulers.


class Scheduler:
    """Base class: table lookups shared by all samplers. Subclasses implement `_plan` and `step`."""

    name = None
    # Whether `step` adds fresh noise (ancestral samplers): the pipeline then draws one tensor per step.
    stochastic = False

    def __init__(self, config=None, *, prediction_type=None):
        """`config`: the training schedule; `None` takes the checkpoint's when a pipeline uses it (see
        `for_checkpoint`). `prediction_type` (`"epsilon"` / `"v_prediction"`) overrides the config's."""
        self._config_given = config is not None
        self._prediction_type = prediction_type
        config = config if config is not None else SchedulerConfig()
        self.config = config if prediction_type is None else dataclasses.replace(config, prediction_type=prediction_type)
        self.alphas_cumprod = alphas_cumprod(self.config)

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, prediction_type={self.config.prediction_type!r})"

    @property
    def key(self):
        """What determines this scheduler's arithmetic: two schedulers with equal keys give the same programs."""
        return (type(self).__qualname__, self.name, self.config)

    def for_checkpoint(self, checkpoint_config):
        """This sampler on a checkpoint's training schedule.

        A scheduler made without a config takes the checkpoint's, prediction type included unless it was
        given one itself; a scheduler made with a config keeps it.

        Example:
        >>> v_model = SchedulerConfig(prediction_type="v_prediction")
        >>> DDIM().for_checkpoint(v_model).config.prediction_type
        'v_prediction'
        """
        if self._config_given:
            return self
        bound = copy.copy(self)
        bound._config_given = True
        bound.config = dataclasses.replace(
            checkpoint_config, prediction_type=self._prediction_type or checkpoint_config.prediction_type
        )
        bound.alphas_cumprod = alphas_cumprod(bound.config)
        return bound

    def plan(self, num_steps):
        """Precomputes the timesteps and tables for `num_steps` denoising steps.

        Example:
        >>> plan = get_scheduler("euler").plan(25)
        >>> plan.timesteps[:2], plan.init_noise_sigma
        (array([999.   , 957.375], dtype=float32), 14.6146...)
        """
        if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if num_steps > self.config.num_train_timesteps:
            raise ValueError(
                f"num_steps ({num_steps}) cannot exceed num_train_timesteps ({self.config.num_train_timesteps})"
            )
        return self._plan(int(num_steps))

    def _plan(self, num_steps):
        raise NotImplementedError

    def initial_state(self, sample):
        """The step state before the first evaluation (history for multistep samplers)."""
        return ()

    def scale_model_input(self, plan, i, sample):
        """The UNet input for evaluation `i`, float32."""
        return _f32(sample) * _at(plan.input_scale, i)

    def step(self, plan, i, model_output, sample, state, noise=None):
        """Moves `sample` from evaluation `i` to the next noise level; returns (prev_sample, new_state)."""
        raise NotImplementedError

    def add_noise(self, plan, original, noise, i):
        """Noises `original` to the noise level of evaluation `i`, as diffusers' `add_noise` at `timesteps[i]`.

        Example:

        >>> scheduler = get_scheduler("ddim")
        >>> plan = scheduler.plan(50)
        >>> start = scheduler.start_index(plan, strength=0.8)
        >>> image_latents = np.zeros((1, 8, 8, 4), "float32")
        >>> latents = scheduler.add_noise(plan, image_latents, np.random.standard_normal(image_latents.shape), start)
        >>> tuple(latents.shape)
        (1, 8, 8, 4)
        """
        return _at(plan.clean_scale, i) * _f32(original) + _at(plan.noise_scale, i) * _f32(noise)

    def start_index(self, plan, strength):
        """First evaluation index of an image-to-image run of `strength` in [0, 1] (1 = from pure noise).

        Follows diffusers' StableDiffusionImg2ImgPipeline.get_timesteps (every class here has order 1).
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        init_timestep = min(int(plan.num_steps * strength), plan.num_steps)
        return max(plan.num_steps - init_timestep, 0)


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMPlan(Plan):
    alpha_cumprod: np.ndarray
    alpha_cumprod_prev: np.ndarray


class DDIM(Scheduler):
    """Deterministic DDIM (η = 0), as diffusers' DDIMScheduler with "leading" spacing."""

    name = "ddim"

    def _plan(self, num_steps):
        config = self.config
        timesteps = leading_timesteps(num_steps, config)
        prev = timesteps - config.num_train_timesteps // num_steps
        alpha = self.alphas_cumprod[timesteps]
        return DDIMPlan(
            num_steps=num_steps,
            init_noise_sigma=1.0,
            **_float32(
                timesteps=timesteps,
                input_scale=np.ones(num_steps),
                clean_scale=np.sqrt(alpha),
                noise_scale=np.sqrt(1.0 - alpha),
                alpha_cumprod=alpha,
                alpha_cumprod_prev=alphas_cumprod_at(self.alphas_cumprod, prev, config),
            ),
        )

    def step(self, plan, i, model_output, sample, state, noise=None):
        sample, model_output = _f32(sample), _f32(model_output)
        # 1. ᾱ_t and ᾱ_{t-Δ} of this step.
        alpha, alpha_prev = _at(plan.alpha_cumprod, i), _at(plan.alpha_cumprod_prev, i)
        # 2. Predicted x0 ("predicted x_0" of eq. (12), Song et al. 2020) and noise.
        x0, eps = _x0_and_eps_vp(model_output, sample, alpha, self.config.prediction_type)
        if self.config.clip_sample:
            x0 = ops.clip(x0, -1.0, 1.0)
        # 3. Eq. (12) with σ_t = 0: sqrt(ᾱ_{t-Δ}) x̂0 + sqrt(1 - ᾱ_{t-Δ}) ε̂ ("direction pointing to x_t").
        return ops.sqrt(alpha_prev) * x0 + ops.sqrt(1.0 - alpha_prev) * eps, state


@dataclasses.dataclass(frozen=True, eq=False)
class PNDMPlan(Plan):
    alpha_cumprod: np.ndarray  # ᾱ at t and t - Δ of the usual step from evaluation i
    alpha_cumprod_prev: np.ndarray
    heun_alpha_cumprod: np.ndarray  # ... and of the second evaluation of a run, which redoes the first step
    heun_alpha_cumprod_prev: np.ndarray


# Multistep weights of the k-th step of a run (rows) on [ε_now, ε_1, ε_2, ε_3], where ε_j is the j-th
# most recent stored output. Row 1 averages with the first output (a Heun step); rows 2-4 are the
# Adams–Bashforth weights of order 2, 3 and 4 (Liu et al. 2022, Algorithm 2 with PLMS warm-up).
_PLMS_WEIGHTS = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],
        [1 / 2, 1 / 2, 0.0, 0.0],
        [3 / 2, -1 / 2, 0.0, 0.0],
        [23 / 12, -16 / 12, 5 / 12, 0.0],
        [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    ]
)


class PNDM(Scheduler):
    """Pseudo linear multistep (PLMS), as diffusers' PNDMScheduler with skip_prk_steps=True.

    The run evaluates the UNet num_steps + 1 times (once for num_steps = 1): the first step is taken
    twice, first as an Euler step to get an output at the next timestep, then again from the same
    sample with the average of both outputs. The state counts the steps of the run, so that an
    image-to-image run started at any index warms up as diffusers does.
    """

    name = "pndm"

    def _plan(self, num_steps):
        config = self.config
        ratio = config.num_train_timesteps // num_steps
        ascending = leading_timesteps(num_steps, config)[::-1]
        timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        alpha = self.alphas_cumprod[timesteps]
        return PNDMPlan(
            num_steps=num_steps,
            init_noise_sigma=1.0,
            **_float32(
                timesteps=timesteps,
                input_scale=np.ones(len(timesteps)),
                clean_scale=np.sqrt(alpha),
                noise_scale=np.sqrt(1.0 - alpha),
                alpha_cumprod=alpha,
                alpha_cumprod_prev=alphas_cumprod_at(self.alphas_cumprod, timesteps - ratio, config),
                # Only used from the second evaluation on, where timesteps + ratio <= timesteps[0].
                heun_alpha_cumprod=self.alphas_cumprod[np.minimum(timesteps + ratio, timesteps[0])],
                heun_alpha_cumprod_prev=alpha,
            ),
        )

    def initial_state(self, sample):
        zeros = ops.zeros_like(_f32(sample))
        # (ε_1, ε_2, ε_3, sample at the start of the run, steps taken in this run)
        return (zeros, zeros, zeros, zeros, ops.convert_to_tensor(0, "int32"))

    def step(self, plan, i, model_output, sample, state, noise=None):
        sample, model_output = _f32(sample), _f32(model_output)
        eps_1, eps_2, eps_3, first_sample, count = state
        heun = ops.equal(count, 1)
        # 1. Combine the current output with the stored ones (linear multistep, Algorithm 2).
        w = ops.take(ops.convert_to_tensor(_PLMS_WEIGHTS, "float32"), ops.minimum(count, len(_PLMS_WEIGHTS) - 1), axis=0)
        combined = w[0] * model_output + w[1] * eps_1 + w[2] * eps_2 + w[3] * eps_3
        # 2. The Heun step restarts from the run's first sample, over the first interval.
        x = ops.where(heun, first_sample, sample)
        alpha = ops.where(heun, _at(plan.heun_alpha_cumprod, i), _at(plan.alpha_cumprod, i))
        alpha_prev = ops.where(heun, _at(plan.heun_alpha_cumprod_prev, i), _at(plan.alpha_cumprod_prev, i))
        # 3. A v-prediction becomes a noise prediction at this step's (x, ᾱ_t).
        _, eps = _x0_and_eps_vp(combined, x, alpha, self.config.prediction_type)
        # 4. Transfer x_t -> x_{t-Δ}, eq. (9) of Liu et al. 2022.
        denominator = alpha * ops.sqrt(1.0 - alpha_prev) + ops.sqrt(alpha * (1.0 - alpha) * alpha_prev)
        prev_sample = ops.sqrt(alpha_prev / alpha) * x - (alpha_prev - alpha) * eps / denominator
        # 5. The Heun evaluation is not stored: it only corrects the first step.
        eps_1, eps_2, eps_3 = (
            ops.where(heun, eps_1, model_output),
            ops.where(heun, eps_2, eps_1),
            ops.where(heun, eps_3, eps_2),
        )
        first_sample = ops.where(ops.equal(count, 0), sample, first_sample)
        return prev_sample, (eps_1, eps_2, eps_3, first_sample, count + 1)


@dataclasses.dataclass(frozen=True, eq=False)
class SigmaPlan(Plan):
    sigmas: np.ndarray  # one more than evaluations: the last is 0


def _sigma_plan(plan_class, num_steps, timesteps, sigmas, **tables):
    """A plan for samplers of x = x0 + σ ε whose UNet input is x / sqrt(σ² + 1)."""
    sigmas = np.append(sigmas, 0.0)
    return plan_class(
        num_steps=num_steps,
        init_noise_sigma=float(np.float32(sigmas.max())),
        **_float32(
            timesteps=timesteps,
            input_scale=1.0 / np.sqrt(sigmas[:-1] ** 2 + 1.0),
            clean_scale=np.ones(num_steps),
            noise_scale=sigmas[:-1],
            sigmas=sigmas,
            **tables,
        ),
    )


class _SigmaScheduler(Scheduler):
    """Samplers on the noise levels σ of the training timesteps, "linspace" spacing."""

    def _timesteps_and_sigmas(self, num_steps):
        last = self.config.num_train_timesteps - 1
        # diffusers keeps these fractional timesteps in float32; σ is interpolated at the rounded values.
        timesteps = linspace_timesteps(num_steps, last).astype(np.float32).astype(np.float64)
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        return timesteps, np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)


@dataclasses.dataclass(frozen=True, eq=False)
class LMSPlan(SigmaPlan):
    lms_coeffs: np.ndarray  # [evaluations, 4]


class LMS(_SigmaScheduler):
    """Linear multistep of order 4 on the probability-flow ODE, as diffusers' LMSDiscreteScheduler."""

    name = "lms"

    def _plan(self, num_steps):
        timesteps, sigmas = self._timesteps_and_sigmas(num_steps)
        coeffs = lms_coefficients(np.append(sigmas, 0.0))
        return _sigma_plan(LMSPlan, num_steps, timesteps, sigmas, lms_coeffs=coeffs)

    def initial_state(self, sample):
        zeros = ops.zeros_like(_f32(sample))
        return (zeros, zeros, zeros)  # the last three derivatives, newest first

    def step(self, plan, i, model_output, sample, state, noise=None):
        sample, model_output = _f32(sample), _f32(model_output)
        # 1. Derivative of the ODE dx/dσ = (x - x̂0) / σ (Karras et al. 2022, eq. (3) with σ(t) = t).
        sigma = _at(plan.sigmas, i)
        derivative = (sample - _x0_ve(model_output, sample, sigma, self.config.prediction_type)) / sigma
        # 2. x_{i+1} = x_i + Σ_j c_ij d_{i-j}; a run starts with no history, so missing terms are zero.
        c = ops.take(ops.convert_to_tensor(plan.lms_coeffs, "float32"), i, axis=0)
        history = (derivative,) + tuple(state)
        prev_sample = sample + sum(c[j] * d for j, d in enumerate(history))
        return prev_sample, history[:3]


class Euler(_SigmaScheduler):
    """Euler steps on the probability-flow ODE, as diffusers' EulerDiscreteScheduler."""

    name = "euler"

    def _plan(self, num_steps):
        timesteps, sigmas = self._timesteps_and_sigmas(num_steps)
        return _sigma_plan(SigmaPlan, num_steps, timesteps, sigmas)

    def step(self, plan, i, model_output, sample, state, noise=None):
        sample, model_output = _f32(sample), _f32(model_output)
        sigma, sigma_next = _at(plan.sigmas, i), _at(plan.sigmas, i + 1)
        # 1. d = (x - x̂0) / σ, the ODE derivative of Algorithm 1 of Karras et al. 2022.
        derivative = (sample - _x0_ve(model_output, sample, sigma, self.config.prediction_type)) / sigma
        # 2. Euler step to the next σ.
        return sample + derivative * (sigma_next - sigma), state


@dataclasses.dataclass(frozen=True, eq=False)
class EulerAncestralPlan(SigmaPlan):
    sigma_down: np.ndarray
    sigma_up: np.ndarray


class EulerAncestral(_SigmaScheduler):
    """Euler steps with fresh noise at each step, as diffusers' EulerAncestralDiscreteScheduler."""

    name = "euler_ancestral"
    stochastic = True

    def _plan(self, num_steps):
        timesteps, sigmas = self._timesteps_and_sigmas(num_steps)
        sigma_from, sigma_to = sigmas, np.append(sigmas[1:], 0.0)
        # Split σ_to² = σ_down² + σ_up² so that the step to σ_down plus noise of std σ_up has the
        # variance of the ancestral (DDPM) step from σ_from to σ_to.
        sigma_up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
        sigma_down = np.sqrt(sigma_to**2 - sigma_up**2)
        return _sigma_plan(
            EulerAncestralPlan, num_steps, timesteps, sigmas, sigma_down=sigma_down, sigma_up=sigma_up
        )

    def step(self, plan, i, model_output, sample, state, noise=None):
        sample, model_output = _f32(sample), _f32(model_output)
        sigma = _at(plan.sigmas, i)
        # 1. ODE derivative d = (x - x̂0) / σ (Karras et al. 2022, Algorithm 1).
        derivative = (sample - _x0_ve(model_output, sample, sigma, self.config.prediction_type)) / sigma
        # 2. Deterministic Euler step down to σ_down, then 3. fresh noise up to σ_to.
        prev_sample = sample + derivative * (_at(plan.sigma_down, i) - sigma)
        return prev_sample + _f32(noise) * _at(plan.sigma_up, i), state


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverPlan(Plan):
    alpha: np.ndarray  # α_s and σ_s of x_s = α_s x0 + σ_s ε at evaluation i
    sigma: np.ndarray
    sample_coeff: np.ndarray  # σ_t / σ_s, t the next noise level
    data_coeff: np.ndarray  # -α_t (e^{-h} - 1), h = λ_t - λ_s, λ = log(α / σ)
    correction: np.ndarray  # 1 / (2 r) with r = h_prev / h, 0 where the step is first order


class DPMSolverPP2M(Scheduler):
    """DPM-Solver++(2M), as diffusers' DPMSolverMultistepScheduler (dpmsolver++, solver_order 2,
    midpoint, lower_order_final, final_sigmas_type "zero"), optionally on Karras sigmas.

    The first step of a run and the last step (to σ = 0) are first order (DDIM).
    """

    def __init__(self, config=None, karras=False, *, prediction_type=None):
        super().__init__(config, prediction_type=prediction_type)
        self.karras = karras
        self.name = "dpmpp_2m_karras" if karras else "dpmpp_2m"

    def _plan(self, num_steps):
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        if self.karras:
            sigmas = karras_sigmas(train_sigmas[0], train_sigmas[-1], num_steps)
            timesteps = np.round(sigma_to_timestep(sigmas, train_sigmas))
        else:
            last = self.config.num_train_timesteps - 1
            timesteps = np.round(linspace_timesteps(num_steps + 1, last)[:-1])
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        # Variance-exploding σ here is σ_s / α_s of the variance-preserving x_s = α_s x0 + σ_s ε.
        ve = np.append(sigmas, 0.0)
        alpha = 1.0 / np.sqrt(ve**2 + 1.0)
        sigma = ve * alpha
        # e^{-h} = e^{λ_s - λ_t} = ve_t / ve_s, finite also for the last step to ve_t = 0.
        exp_neg_h = ve[1:] / ve[:-1]
        log_ratio = np.log(ve[:-1])
        h = np.full(num_steps, np.inf)
        h[:-1] = log_ratio[:-1] - log_ratio[1:]
        correction = np.zeros(num_steps)
        correction[1:-1] = 0.5 * h[1:-1] / h[:-2]
        return DPMSolverPlan(
            num_steps=num_steps,
            init_noise_sigma=1.0,
            **_float32(
                timesteps=timesteps,
                input_scale=np.ones(num_steps),
                clean_scale=alpha[:-1],
                noise_scale=sigma[:-1],
                alpha=alpha[:-1],
                sigma=sigma[:-1],
                sample_coeff=sigma[1:] / sigma[:-1],
                data_coeff=alpha[1:] * (1.0 - exp_neg_h),
                correction=correction,
            ),
        )

    def initial_state(self, sample):
        # (previous data prediction x̂0, steps taken in this run)
        return (ops.zeros_like(_f32(sample)), ops.convert_to_tensor(0, "int32"))

    def step(self, plan, i, model_output, sample, state, noise=None):
        sample, model_output = _f32(sample), _f32(model_output)
        previous_x0, count = state
        # 1. Data prediction x̂0 (DPM-Solver++ integrates the data-prediction model, Lu et al. 2022b).
        alpha, sigma = _at(plan.alpha, i), _at(plan.sigma, i)
        if self.config.prediction_type == "v_prediction":
            x0 = alpha * sample - sigma * model_output
        else:
            x0 = (sample - sigma * model_output) / alpha
        # 2. D = (1 + 1/(2r)) x̂0_i - 1/(2r) x̂0_{i-1}, first order when the run has no history yet.
        correction = ops.where(ops.greater(count, 0), _at(plan.correction, i), 0.0)
        data = x0 + correction * (x0 - previous_x0)
        # 3. x_t = (σ_t / σ_s) x_s - α_t (e^{-h} - 1) D, Algorithm 2 (DPM-Solver++(2M)) of Lu et al. 2022b.
        prev_sample = _at(plan.sample_coeff, i) * sample + _at(plan.data_coeff, i) * data
        return prev_sample, (x0, count + 1)


_SCHEDULERS = {
    "ddim": DDIM,
    "pndm": PNDM,
    "lms": LMS,
    "euler": Euler,
    "euler_ancestral": EulerAncestral,
    "dpmpp_2m": DPMSolverPP2M,
    "dpmpp_2m_karras": functools.partial(DPMSolverPP2M, karras=True),
}


def get_scheduler(name_or_scheduler, config=None):
    """Returns a scheduler from its name (see `SCHEDULER_NAMES`); a `Scheduler` is returned as is.

    Without a `config`, a named scheduler takes a checkpoint's config when a pipeline uses it.

    Example:
    >>> scheduler = get_scheduler("dpmpp_2m_karras", SchedulerConfig(prediction_type="v_prediction"))
    >>> plan = scheduler.plan(20)
    """
    if isinstance(name_or_scheduler, Scheduler):
        return name_or_scheduler
    if not isinstance(name_or_scheduler, str) or name_or_scheduler not in _SCHEDULERS:
        raise ValueError(
            f"Unknown scheduler {name_or_scheduler!r}; valid names are: {', '.join(SCHEDULER_NAMES)}"
        )
    return _SCHEDULERS[name_or_scheduler](config)
