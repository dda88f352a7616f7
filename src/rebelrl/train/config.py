"""The configs of ``rebelrl train``, ``rebelrl eval`` and ``rebelrl generate``.

Names follow the papers: ``eta`` (REBEL step size), ``kl_coef`` (penalty on log pi_t - log pi_ref).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rebelrl.config import field
from rebelrl.models import DEFAULT_MODEL
from rebelrl.train.validate import validate


@dataclass
class ModelConfig:
    name: str = field(DEFAULT_MODEL, "policy: a built-in alias (smollm2-135m-instruct, tiny-random), a local folder or a hub id")
    ref_name: str | None = field(None, "reference model; null = the policy's starting weights")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", "parameter dtype (training refuses float16: use bfloat16)")
    lora_r: int = field(0, "LoRA rank; 0 trains all weights. With LoRA the reference is the model with the adapter off")
    lora_alpha: float = field(16.0, "LoRA alpha")
    lora_dropout: float = field(0.0, "LoRA dropout; training refuses > 0: dropout is off, as the policy regressed must be the one that sampled")
    lora_target_modules: str = field("all-linear", "LoRA target modules (a PEFT spec)")
    activation_checkpointing: bool = field(
        False, "recompute each layer's activations in the backward pass instead of keeping them: far less memory, a longer update"
    )


@dataclass
class TaskConfig:
    name: Literal["chitchat-warm", "reasoning-gym", "prompts", "chitchat-dialogue", "secret", "guess-number", "env", "openenv",
                  "preferences", "demonstrations"] = field(
        "chitchat-warm",
        "chitchat-warm: reply warmly to opening lines of real chats (VADER reward); reasoning-gym: a "
        "reasoning-gym dataset with its answer checker; prompts: your own prompt file; chitchat-dialogue: "
        "multi-turn chitchat-warm with a simulated user; secret: multi-turn, find the user's secret animal "
        "by asking questions; guess-number: multi-turn, find the user's number from higher/lower answers (and hints, with task.hints); "
        "env: your own multi-turn Env (task.env); openenv: an OpenEnv environment (task.env: its class or its URL); preferences: a file of (prompt, chosen, rejected) pairs (task.data; algo dpo, hypo, "
        "reward_model, sft, alol); demonstrations: a file of chats or prompt/completion rows (task.data; algo sft, alol)",
    )
    data: str | None = field(None, "task=preferences/demonstrations: the training rows (.jsonl, .parquet, a saved datasets folder, or hf:NAME[:SPLIT])")
    eval_data: str | None = field(None, "task=preferences/demonstrations: held-out rows; null = split n_eval rows off task.data")
    prompts: str | None = field(None, "task=prompts: training prompts (.jsonl, .parquet, a saved datasets folder, or hf:NAME[:SPLIT])")
    eval_prompts: str | None = field(None, "task=prompts: held-out prompts; null = split n_eval rows off the training prompts")
    prompt_field: str = field("prompt", "column holding the prompt text (task=prompts, preferences, demonstrations)")
    messages_field: str = field("messages", "column holding a chat as a list of {role, content} (used when the prompt column is absent; "
                                "task=prompts, demonstrations)")
    system_prompt: str | None = field(None, "system message put before every prompt that has none (null = the task's default)")
    dataset: str = field("basic_arithmetic", "task=reasoning-gym: the reasoning-gym dataset name")
    dataset_kwargs: dict = field({}, "task=reasoning-gym: the dataset's config (difficulty), e.g. {max_terms: 2, max_digits: 1}")
    instruction: str | None = field(None, "task=reasoning-gym: text after each question; null = think step by step, answer in <answer></answer> tags")
    n_train: int = field(2000, "number of training prompts (at most)")
    n_eval: int = field(64, "number of held-out prompts for evaluation")
    horizon: int = field(5, "multi-turn tasks: assistant turns per dialogue (H)")
    items: list[str] = field([], "task=secret: the animals a secret is drawn from; empty = the whole catalog")
    max_number: int = field(8, "task=guess-number: the number is drawn from 1..max_number")
    hints: bool = field(False, "task=guess-number: a reply with no number asks for a hint, and the user tells the number")
    rounds: int = field(1, "task=guess-number: numbers the user holds one after another; the reward counts those found")
    user: str | None = field(None, "task=chitchat-dialogue: your own UserSimulator (module:attr); null = an LM plays the user")
    user_kwargs: dict = field({}, "keyword arguments for task.user (a factory or class)")
    user_model: str = field(DEFAULT_MODEL, "task=chitchat-dialogue: the model that plays the user when task.user is null")
    env: str | None = field(None, "task=env: import path module:attr of an Env, or of a factory when env_kwargs is set; task=openenv: "
                            "an OpenEnv Environment class (module:Class) run in this process, or the URL of one served (http://127.0.0.1:8000)")
    env_kwargs: dict = field({}, "keyword arguments for task.env (task=env: the horizon is passed as `horizon`)")
    action_field: str = field("message", "task=openenv: the field of the environment's action that holds the reply's text")
    observation_field: str | None = field(None, "task=openenv: the observation's field that holds the next user message; null = its only text field")
    action_class: str | None = field(None, "task=openenv: the action class (module:Class); null = the one the environment class declares")
    prompt_format: Literal["auto", "chat", "plain"] = field(
        "auto", "chat: render with the model's chat template; plain: the messages' texts in order, each reply ended by EOS "
        "(for base models); auto: chat if the tokenizer has a template, else plain"
    )


@dataclass
class RewardConfig:
    fn: str | None = field(None, "reward: a built-in name (vader, reasoning_gym) or an import path module:function; null = the task's reward")
    kwargs: dict = field({}, "if non-empty, fn is a factory called with these keyword arguments to build the reward")
    no_eos_penalty: float | None = field(-1.0, "score given to a completion that never emitted EOS; null keeps its score")


@dataclass
class RolloutConfig:
    prompts_per_iter: int = field(32, "prompts sampled per iteration")
    samples_per_prompt: int = field(2, "completions sampled per prompt (k); REBEL needs k >= 2")
    pairing: Literal["best_worst", "adjacent"] = field(
        "best_worst", "k > 2: best_worst pairs the highest- with the lowest-reward completion of each prompt; adjacent pairs (0,1), (2,3), ..."
    )
    temperature: float = field(0.7, "sampling temperature (also divides the logits in every log-prob)")
    top_p: float = field(1.0, "nucleus sampling; 1 disables")
    top_k: int = field(0, "top-k sampling; 0 disables")
    max_new_tokens: int = field(48, "token budget per completion")
    repetition_penalty: float = field(1.0, "penalty on tokens already in the context (Transformers' rule); 1 disables")
    min_new_tokens: int = field(0, "the stop tokens are masked until a reply has this many tokens; 0 disables")
    batch_size: int = field(32, "prompts per generate call")
    old_logprobs: Literal["auto", "sampler", "recompute"] = field(
        "auto", "where log pi_t comes from: the sampler's record (checked against the training forward every iteration; "
        "recomputed from then on if it drifts past logprob_tolerance), a no-grad forward after sampling, or auto: the "
        "sampler's record in float32, recompute otherwise"
    )
    logprob_tolerance: float = field(1e-3, "largest accepted gap (nats a reply) between log pi_t and the training forward before the first step")
    backend: Literal["hf", "vllm"] = field(
        "hf", "what samples the training and held-out replies: hf (rebelrl's own decoding loop on the policy) or vllm (a vLLM engine "
        "that rebelrl starts on loopback in the environment of scripts/setup_vllm.sh and loads the policy's weights into after every "
        "update; log pi_t is then always recomputed by the trainer)")
    vllm_python: str | None = field(None, "rollout.backend=vllm: the python of the environment vLLM is installed in; null = "
                                          "$REBELRL_VLLM_PYTHON, else .venv-vllm/bin/python")
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field("auto", "rollout.backend=vllm: the engine's dtype; auto = model.dtype")
    vllm_memory: float | None = field(None, "rollout.backend=vllm: the engine's KV cache, in GiB on a CPU (null = 2), or the share of "
                                            "the GPU's memory it may take (null = 0.3: the trainer shares the GPU)")
    vllm_lora: Literal["merged", "adapter"] = field("merged", "rollout.backend=vllm with model.lora_r > 0: the adapter merged into the "
                                                    "weights loaded into the engine, or loaded as an adapter the engine applies")
    vllm_start_timeout: float = field(900.0, "rollout.backend=vllm: seconds the engine may take to start (about 100 s on a 2-core CPU)")
    vllm_eager: bool = field(False, "rollout.backend=vllm: run the engine's model eagerly, without compiling it or capturing graphs: "
                                    "it starts sooner and decodes slower, which suits short runs")


@dataclass
class UpdateConfig:
    epochs: int | None = field(None, "passes over each iteration's samples; null = the method's: 1 for astar_po (as its authors and TRL) and the offline methods, 4 otherwise")
    minibatch_size: int = field(8, "pairs (rebel, refuel, online_dpo) or completions (rloo, grpo, ppo, astar_po) per optimizer step")
    micro_batch_size: int = field(8, "the same, per forward/backward (gradient accumulation = minibatch / micro)")


@dataclass
class ResetConfig:
    data: str | None = field(None, "dataset reset (DR-PO): a preference or demonstration file (as task.data) whose replies rollouts are reset to; "
                                   "null = no reset")
    prob: float = field(1.0, "probability that a prompt's rollouts are reset (the authors' beta; 1 = every prompt that has a reply in reset.data)")
    # ``field`` is the last setting of this class: from here on, the name is the setting, not the helper.
    field: Literal["chosen", "rejected", "completion"] = field("chosen", "which reply of a reset.data row: chosen or rejected (a preference file), completion (a demonstration "
                                   "file: its last assistant reply)")


@dataclass
class GuideConfig:
    mode: Literal["none", "rollin", "rollout", "lols", "d2lols"] = field(
        "none", "guided roll-in / roll-out (RLGF): rollin (PPO++: the guide writes a prefix, the policy the rest), rollout (AggreVaTeD: the "
                "policy writes a prefix, the guide the rest), lols (rollin with probability guide.switch each iteration, else rollout), "
                "d2lols (rollout before iteration guide.switch, rollin from it on); none: no guide")
    model: str | None = field(None, "the guide: a causal LM by name or path with the policy's tokenizer; null = the reference policy")
    prob: float = field(0.8, "the chance that a prompt's replies are guided (the authors' beta; 0.8 in most of their configs)")
    switch: float | None = field(None, "lols: the chance of roll-in each iteration (null = the authors' 0.8); d2lols: the iteration "
                                       "from which roll-in replaces roll-out (required)")
    top_p: float = field(0.92, "the guide samples at the rollout's temperature and this top-p (the authors' 0.92)")


@dataclass
class RebelConfig:
    eta: float = field(1.0, "REBEL step size: target log-ratio difference per unit of reward difference")
    kl_coef: float = field(0.05, "reward -= kl_coef * (log pi_t(y|x) - log pi_ref(y|x)), per sequence")


@dataclass
class RefuelConfig:
    rollin: Literal["policy", "reference"] = field(
        "policy", "who plays the turns before h: the current policy (REFUEL) or the frozen initial policy (single-turn baselines)"
    )
    target: Literal["future", "turn"] = field(
        "future", "future: continue both branches to the end turn L and score there (REFUEL); turn: score the dialogue at turn h"
    )
    end_turn: Literal["sampled", "horizon"] = field("sampled", "L ~ U{1..H} then h ~ U{1..L} (as the authors), or always L = H")
    loss: Literal["rebel", "dpo"] = field("rebel", "regress with rebel_loss, or DPO on the better/worse branch (ties dropped)")
    beta: float = field(0.1, "loss=dpo: DPO beta")


@dataclass
class OnlineDpoConfig:
    loss: Literal["dpo", "ipo", "chipo"] = field("dpo", "pair loss on each prompt's best vs worst completion: DPO, IPO (per-token averaged) or chi-PO")
    beta: float = field(0.1, "the loss's beta (IPO: tau)")
    r_max: float | None = field(None, "loss=chipo: the paper's reward bound; the margin is clipped to [-2 r_max, 2 r_max]; null = no clip")


@dataclass
class DpoConfig:
    loss: Literal["sigmoid", "ipo", "chipo"] = field("sigmoid", "sigmoid: DPO; ipo: IPO on per-token averaged log-ratios; chipo: chi-PO (link z + log z)")
    beta: float = field(0.1, "the loss's beta (IPO: tau); TRL's default 0.1")
    r_max: float | None = field(None, "loss=chipo: the paper's reward bound; the margin is clipped to [-2 r_max, 2 r_max]; null = no clip")


@dataclass
class HypoConfig:
    kl_coef: float = field(0.1, "the paper's lambda: weight of KL(pi || pi_ref), estimated on fresh samples of the policy")


@dataclass
class SftConfig:
    packing: bool = field(False, "pack each iteration's demonstrations into sequences of up to sft.max_length tokens (best fit, no row split), "
                                 "each row attending only to itself: a micro-batch is update.micro_batch_size packed sequences, with no padding "
                                 "between rows; the loss is the unpacked one")
    max_length: int = field(1024, "packing: tokens of a packed sequence (TRL's default); every demonstration must fit in it")


@dataclass
class AlolConfig:
    variant: Literal["alol", "seq", "ref_free", "kl"] = field(
        "alol", "alol: A+ x clipped pi/pi_ref of the reply x its NLL; seq: the ratio clipped per token; ref_free: A x NLL, no ratio; "
                "kl: A+ x NLL plus kl_beta x log pi/pi_ref (which shifts the advantage by kl_beta)")
    kl_beta: float | None = field(None, "variant=kl: the weight of log pi/pi_ref; no usable default exists, so it must be set")
    priority: bool = field(True, "draw each iteration's rows with probability proportional to A+ (with replacement), as the authors; "
                                 "false: the data's rows in shuffled epochs")
    weight_min: float = field(0.1, "the importance weight's lower clip (the authors' 0.1)")
    weight_max: float = field(1.9, "the importance weight's upper clip (the authors' 1.9)")
    value_ridge: float = field(1.0, "ridge penalty of V_ref's linear head, fitted in closed form on the reference's prompt states")


@dataclass
class RewardModelConfig:
    center_coef: float = field(0.01, "weight of mean((r+ + r-)^2), which keeps the scores centred at 0 (TRL's center_rewards_coefficient)")
    use_margin: bool = field(True, "subtract the data's margin column from r+ - r- where the rows have one")


@dataclass
class RlooConfig:
    kl_coef: float = field(0.05, "reward -= kl_coef * (log pi_t(y|x) - log pi_ref(y|x)), per completion")
    clip_eps: float = field(0.2, "clip of the sequence-level importance ratio across epochs")


@dataclass
class GrpoConfig:
    beta: float = field(0.0, "coefficient of the per-token k3 KL to the reference in the loss (DeepSeekMath: 0.04)")
    clip_eps: float = field(0.2, "lower (and upper) clip of the per-token ratio")
    clip_eps_high: float | None = field(None, "upper clip; null = clip_eps (DAPO: 0.28)")
    scale_advantages: bool = field(True, "divide by the group's standard deviation; false = Dr. GRPO")
    aggregation: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = field(
        "seq_mean_token_mean", "per-completion mean then batch mean (GRPO), mean over all tokens (DAPO), or token sum / budget (Dr. GRPO)"
    )


@dataclass
class PpoConfig:
    kl_coef: float = field(0.05, "per-token reward -= kl_coef * (log pi_t - log pi_ref)")
    clip_eps: float = field(0.2, "clip of the per-token ratio")
    value_clip: float | None = field(0.2, "clip of the value update around the old value; null disables")
    vf_coef: float = field(0.1, "weight of the value loss")
    gamma: float = field(1.0, "discount")
    gae_lambda: float = field(0.95, "GAE lambda")
    whiten_advantages: bool = field(True, "normalise advantages over the batch")
    critic: Literal["shared", "separate"] = field("shared", "value head on the policy's network, or on a separate copy of it")


@dataclass
class AstarConfig:
    ref_samples: int = field(8, "stage 1: reference completions per prompt to estimate V*(x)")
    beta1: float = field(0.5, "V*(x) = beta1 * log mean exp(r / beta1)")
    beta2: float = field(1e-3, "loss = (beta2 * log(pi/pi_ref) - (r - V*))^2")


@dataclass
class OptimConfig:
    lr: float = field(3e-6, "AdamW learning rate")
    weight_decay: float = field(0.0, "AdamW weight decay")
    betas: list[float] = field([0.9, 0.999], "AdamW betas")
    schedule: Literal["constant", "linear", "cosine"] = field("linear", "learning-rate decay over all optimizer steps")
    warmup_steps: int = field(0, "linear warm-up steps")
    max_grad_norm: float = field(1.0, "gradient clipping by global norm; 0 disables")


@dataclass
class EvalConfig:
    every: int = field(5, "evaluate on the held-out prompts every N iterations (and before training and at the end); 0 = only before and after")
    temperature: float | None = field(None, "sampling temperature for evaluation; null = the rollout temperature")
    max_new_tokens: int | None = field(None, "null = the rollout budget")
    seed: int = field(1234, "evaluation sampling seed: the same prompts and noise at every evaluation")
    gold_fn: str | None = field(
        None, "a second reward (built-in name or module:function) that judges the same held-out samples, logged as gold_reward_mean: "
        "the reward a method optimising a proxy (a reward model) never sees; single-turn tasks, one process"
    )
    gold_kwargs: dict = field({}, "keyword arguments for eval.gold_fn (a factory)")
    initial_from: str | None = field(
        None, "a run directory of the same model, task and evaluation settings whose iteration-0 evaluation is reused instead of recomputed"
    )


@dataclass
class CheckpointConfig:
    every: int = field(5, "save a checkpoint every N iterations (and at the end); 0 = only at the end")
    keep_last: int = field(2, "checkpoints kept (older ones are deleted after a newer one is complete); 0 keeps all")


@dataclass
class LogConfig:
    report_to: list[str] = field(
        [], "experiment trackers fed every row of metrics.jsonl and eval.jsonl, a held-out sample table and histograms at each evaluation: "
        "any of trackio, tensorboard, wandb, mlflow (each an optional extra: pip install 'rebelrl[trackio]')"
    )
    project: str = field("rebelrl", "the trackers' project (trackio and W&B project, MLflow experiment)")
    name: str | None = field(None, "the tracked run's name; null = the run directory's name")
    group: str | None = field(None, "the group of tracked runs this one belongs to (compare sets it to the comparison and task)")
    sample_rows: int = field(32, "held-out prompts in the sample table sent to the trackers (the Parquet table in samples/ has all)")


@dataclass
class ExportConfig:
    at_end: bool = field(True, "when the run ends, write the policy as a plain Hugging Face folder with a model card in run_dir/model")
    adapter_only: bool = field(False, "with LoRA: export the adapter alone (on its base model) instead of merging it into the weights")


# Passes over an iteration's samples where update.epochs is not set: A*-PO's authors (and TRL) make one;
# an offline method's iteration is one step on its minibatch.
DEFAULT_EPOCHS = {"astar_po": 1, "dpo": 1, "hypo": 1, "sft": 1, "reward_model": 1, "alol": 1}
OFFLINE_ALGOS = ("dpo", "hypo", "sft", "reward_model", "alol")


@dataclass
class TrainConfig:
    algo: Literal["rebel", "refuel", "online_dpo", "rloo", "grpo", "ppo", "astar_po", "dpo", "hypo", "sft", "reward_model", "alol"] = field(
        "rebel", "rebel: single-turn prompts; refuel: multi-turn dialogues (task=chitchat-dialogue, secret, guess-number or env); "
        "online_dpo, rloo, grpo, ppo, astar_po: the single-turn methods REBEL is compared with, on the same loop; "
        "dpo, hypo, reward_model (task=preferences) and sft (task=demonstrations): offline methods on a dataset, an iteration "
        "being one optimizer step on update.minibatch_size rows; alol: A-LoL, offline policy gradient on scored replies "
        "(task=demonstrations, or preferences: both replies of each pair; reward.fn)"
    )
    run_dir: str = field("runs/rebel", "output folder: config.yaml, metrics.jsonl, eval.jsonl, checkpoints/, report.md, plots/")
    iterations: int = field(10, "collect -> score -> update rounds")
    seed: int = field(0, "seed for sampling, data order and initialisation")
    resume: bool = field(False, "continue from the last checkpoint in run_dir")
    allow_config_change: bool = field(False, "with resume: accept values that differ from the run's config (recorded in config_changes.jsonl)")
    threads: int | None = field(None, "CPU threads for torch; null = torch's default")
    free_memory: Literal["between_phases", "at_once"] = field(
        "between_phases", "between_phases: freed memory goes back to the system where each phase of an iteration ends "
        "(milliseconds, and the next phase faults its pages in again); "
        "at_once: every tensor of 1 MB or more is given back the moment it is freed (Linux with glibc): the lowest peak memory, "
        "about a third slower on CPU; with model.activation_checkpointing, the lean mode"
    )
    model: ModelConfig = field(ModelConfig())
    task: TaskConfig = field(TaskConfig())
    reward: RewardConfig = field(RewardConfig())
    rollout: RolloutConfig = field(RolloutConfig())
    update: UpdateConfig = field(UpdateConfig())
    reset: ResetConfig = field(ResetConfig())
    guide: GuideConfig = field(GuideConfig())
    rebel: RebelConfig = field(RebelConfig())
    refuel: RefuelConfig = field(RefuelConfig())
    online_dpo: OnlineDpoConfig = field(OnlineDpoConfig())
    rloo: RlooConfig = field(RlooConfig())
    grpo: GrpoConfig = field(GrpoConfig())
    ppo: PpoConfig = field(PpoConfig())
    astar: AstarConfig = field(AstarConfig())
    dpo: DpoConfig = field(DpoConfig())
    hypo: HypoConfig = field(HypoConfig())
    sft: SftConfig = field(SftConfig())
    alol: AlolConfig = field(AlolConfig())
    reward_model: RewardModelConfig = field(RewardModelConfig())
    optim: OptimConfig = field(OptimConfig())
    eval: EvalConfig = field(EvalConfig())
    checkpoint: CheckpointConfig = field(CheckpointConfig())
    log: LogConfig = field(LogConfig())
    export: ExportConfig = field(ExportConfig())

    def __post_init__(self) -> None:
        if self.update.epochs is None:
            self.update.epochs = DEFAULT_EPOCHS.get(self.algo, 4)
        validate(self)

    @property
    def pairs_per_iter(self) -> int:
        k = self.rollout.samples_per_prompt
        per_prompt = 1 if self.rollout.pairing == "best_worst" else k // 2
        return self.rollout.prompts_per_iter * per_prompt


@dataclass
class EvalCommandConfig:
    model: str = field(DEFAULT_MODEL, "model to evaluate (alias, folder, hub id, or a run's checkpoints/iter-N/model)")
    baseline: str | None = field(None, "model whose completions it is compared against; null = the task's model.name default")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", "parameter dtype")
    task: TaskConfig = field(TaskConfig())
    reward: RewardConfig = field(RewardConfig())
    temperature: float = field(0.7, "sampling temperature; 0 = greedy (then the log-ratio to the baseline is reported, not a KL)")
    top_p: float = field(1.0, "nucleus sampling; 1 disables")
    top_k: int = field(0, "top-k sampling; 0 disables")
    repetition_penalty: float = field(1.0, "penalty on tokens already in the context; 1 disables")
    max_new_tokens: int = field(48, "token budget per completion")
    batch_size: int = field(32, "prompts per generate call")
    seed: int = field(1234, "sampling seed")
    output: str | None = field(None, "write per-prompt completions and scores to this JSONL file")

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class GenerateConfig:
    model: str = field(DEFAULT_MODEL, "model (alias, folder, hub id)")
    prompts: str | None = field(None, "prompt file (.jsonl/.parquet/datasets folder/hf:NAME); null = use `prompt`")
    prompt: str | None = field(None, "a single prompt")
    system_prompt: str | None = field(None, "system message for every prompt")
    n: int = field(1, "completions per prompt")
    temperature: float = field(0.7, "sampling temperature; 0 = greedy")
    top_p: float = field(1.0, "nucleus sampling")
    top_k: int = field(0, "top-k sampling; 0 disables")
    repetition_penalty: float = field(1.0, "penalty on tokens already in the context; 1 disables")
    max_new_tokens: int = field(64, "token budget per completion")
    prompt_format: Literal["auto", "chat", "plain"] = field("auto", "chat template, plain text, or auto (chat if the tokenizer has a template)")
    batch_size: int = field(16, "prompts per generate call")
    seed: int = field(0, "sampling seed")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", "parameter dtype")
    output: str | None = field(None, "write completions to this JSONL file instead of printing them")

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class PairsConfig:
    model: str = field(DEFAULT_MODEL, "model that samples the replies (alias, folder, hub id)")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", "parameter dtype")
    task: TaskConfig = field(TaskConfig())
    reward: RewardConfig = field(RewardConfig())
    split: Literal["train", "eval", "all"] = field("train", "which of the task's prompts get pairs: training, held-out, or both")
    samples_per_prompt: int = field(4, "replies sampled per prompt (k); the best and the worst make the pair")
    temperature: float = field(0.7, "sampling temperature")
    top_p: float = field(1.0, "nucleus sampling; 1 disables")
    top_k: int = field(0, "top-k sampling; 0 disables")
    repetition_penalty: float = field(1.0, "penalty on tokens already in the context; 1 disables")
    max_new_tokens: int = field(64, "token budget per reply")
    batch_size: int = field(16, "prompts per generate call")
    seed: int = field(0, "sampling seed (and the seed of the Bradley-Terry labels)")
    bt_beta: float | None = field(
        None, "null: chosen = the best-scored reply, rejected = the worst; a number: Bradley-Terry labels, the best chosen "
        "with probability sigmoid(bt_beta * (s_best - s_worst)), else the two swapped"
    )
    output: str | None = field(None, "the pairs file to write (.jsonl); required")
    overwrite: bool = field(False, "replace output if it exists (otherwise an existing file is refused)")

    def __post_init__(self) -> None:
        validate(self)
