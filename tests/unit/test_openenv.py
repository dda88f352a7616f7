"""OpenEnv environments as dialogues: the adapter by hand, and REFUEL through the CLI on the tiny model."""

from __future__ import annotations

import pytest

pytest.importorskip("openenv")

from rebelrl.cli import main  # noqa: E402
from rebelrl.envs.openenv import SEED_KEY, OpenEnvAdapter, OpenEnvError  # noqa: E402
from tests.tiny_run import REFUEL_ARGS, one_line, read_jsonl  # noqa: E402

GAME = '''
import random

from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State


class Guess(Action):
    message: str


class Said(Observation):
    text: str = ""


class GuessEnv(Environment[Guess, Said, State]):
    """Find my letter among a, b, c: each reply that names it scores 1, and the game goes on."""

    SUPPORTS_CONCURRENT_SESSIONS = True  # each session is its own instance

    def __init__(self, letters="abc"):
        super().__init__()
        self.letters, self._state = letters, State()

    def reset(self, seed=None, episode_id=None, **kwargs):
        self.rng = random.Random(seed)
        self.letter, self.steps = self.rng.choice(self.letters), 0
        return Said(text=f"Guess my letter ({', '.join(self.letters)}). Hint: {self.rng.random():.3f}")

    def step(self, action, timeout_s=None, **kwargs):
        self.steps += 1
        hit, hint = self.letter in action.message.lower(), self.rng.random()
        if hit:
            self.letter = self.rng.choice(self.letters)
        return Said(text=f"{'Yes' if hit else 'No'}! Next hint: {hint:.3f}", reward=float(hit), done=self.steps >= 5)

    @property
    def state(self):
        return self._state


class Uncopyable(GuessEnv):
    def __deepcopy__(self, memo):
        raise TypeError("holds a live handle")


class Unseeded(GuessEnv):
    """Ignores its seed after the opening: a replay cannot find the same dialogue again."""

    def step(self, action, timeout_s=None, **kwargs):
        out = super().step(action)
        return Said(text=f"{out.text} {random.random():.6f}", reward=out.reward, done=out.done)
'''


@pytest.fixture
def game(tmp_path, monkeypatch):
    (tmp_path / "letter_game.py").write_text(GAME)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "letter_game"


def test_dialogues_follow_the_environment_and_branch_by_copy_or_replay(game):
    for cls in ("GuessEnv", "Uncopyable"):
        adapter = OpenEnvAdapter(f"{game}:{cls}", horizon=3)
        start = adapter.reset(2, seed=7)
        assert [c.meta[SEED_KEY] for c in start] == [7 * 1_000_003, 7 * 1_000_003 + 1]
        assert start[0].messages[0].content.startswith("Guess my letter (a, b, c). Hint: ")
        assert adapter.reset(2, seed=7) == start  # the same openings for the same seed
        # two branches of the same dialogue: each continues the same state
        turn1 = [start[0].with_reply(r) for r in ("a", "b", "c")]
        results = adapter.step(turn1)
        assert sum(r.user_message.startswith("Yes") for r in results) == 1 and not any(r.done for r in results)
        rewards = adapter.reward(turn1)
        assert sorted(rewards) == [0.0, 0.0, 1.0]
        # the hint after each branch is the same draw of the same generator: the branches share their past
        assert len({r.user_message.split("Next hint: ")[1] for r in results}) == 1
        right = turn1[rewards.index(1.0)].with_reply(results[rewards.index(1.0)].user_message, role="user")
        turn2 = [right.with_reply(r) for r in ("a", "b", "c")]
        second = adapter.step(turn2)
        assert sorted(adapter.reward(turn2)) == [1.0, 1.0, 2.0]  # rewards summed along the dialogue
        ended = adapter.step([turn2[0].with_reply(second[0].user_message, role="user").with_reply("a")])
        assert ended[0].done and ended[0].user_message is None  # the horizon (3 replies)
        # a fresh adapter (another process) scores a dialogue by replaying it
        assert OpenEnvAdapter(f"{game}:{cls}", horizon=3).reward(turn2) == adapter.reward(turn2)


def test_a_replay_that_differs_is_refused(game):
    adapter = OpenEnvAdapter(f"{game}:Unseeded", horizon=3)
    start = adapter.reset(1, seed=1)[0]
    first = start.with_reply("a")
    said = adapter.step([first])[0].user_message
    with pytest.raises(OpenEnvError, match="replaying the dialogue seeded 1000003 gave .* at turn 1 where the dialogue has .*not a function of its seed"):
        OpenEnvAdapter(f"{game}:Unseeded", horizon=3).step([first.with_reply(said, role="user").with_reply("b")])


def test_observation_and_action_fields_are_checked(game):
    with pytest.raises(Exception, match="task.action_field='text': Guess, the action of letter_game:GuessEnv, has no such field .it has message"):
        OpenEnvAdapter(f"{game}:GuessEnv", horizon=2, action_field="text")
    with pytest.raises(OpenEnvError, match="the observation has no field 'words'"):
        OpenEnvAdapter(f"{game}:GuessEnv", horizon=2, observation_field="words").reset(1, seed=0)


def _refuel(tmp_path, game, cls, *extra):
    args = [a for a in REFUEL_ARGS if not a.startswith(("task.name", "task.env", "task.n_train", "reward.fn"))]
    return main(["train", *args, "task.name=openenv", f"task.env={game}:{cls}", "task.n_train=16", "task.horizon=3", "iterations=3",
                 "eval.every=3", "checkpoint.every=3", f"run_dir={tmp_path / cls}", *extra])


def test_refuel_trains_on_an_openenv_environment(tmp_path, game):
    assert _refuel(tmp_path, game, "Uncopyable") == 0  # REFUEL branches every dialogue: here by replay
    evals = read_jsonl(tmp_path / "Uncopyable" / "eval.jsonl")
    assert [e["iteration"] for e in evals] == [0, 3]
    assert all(0.0 <= e["reward_mean"] <= 3.0 for e in evals) and "reward_turn_3" in evals[-1]
    samples = read_jsonl(tmp_path / "Uncopyable" / "eval_samples_latest.jsonl")
    assert len(samples) == 6 and all(m["content"] for s in samples for m in s["messages"])


def test_refuel_stops_in_one_line_on_an_environment_that_replays_differently(tmp_path, game, capsys):
    assert _refuel(tmp_path, game, "Unseeded") == 2
    assert "not a function of its seed" in one_line(capsys)


@pytest.fixture
def served(game):
    """The letter game served on loopback by OpenEnv's own server, stopped when the test ends."""
    import importlib
    import socket
    import threading
    import time

    import uvicorn
    from openenv.core.env_server.http_server import create_fastapi_app

    module = importlib.import_module(game)
    app = create_fastapi_app(module.GuessEnv, module.Guess, module.Said, max_concurrent_envs=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_served_environment_plays_the_same_dialogues(game, served):
    local, remote = OpenEnvAdapter(f"{game}:GuessEnv", horizon=3), OpenEnvAdapter(served, horizon=3, observation_field="text")
    start = remote.reset(2, seed=3)
    assert start == local.reset(2, seed=3)
    turn1 = [start[1].with_reply(r) for r in ("a", "b", "c")]  # branches: a served episode is replayed, never copied
    assert remote.step(turn1) == local.step(turn1)
    assert remote.reward(turn1) == local.reward(turn1)
