"""Red-teaming: attacks that try to bring an erased concept back, and the attack success rate.

Every attack has one interface (:mod:`erasekit.attacks.base`): given the edited pipeline, the
original one, the erased concept and a set of prompts, it returns adversarial prompts, token ids or
embeddings, and :func:`run_attack` generates the edited model's images from them (deterministic
under a seed, resumable over the prompt set, with its cost in time and model calls).

============  =========  ==========================================================================
name          access     idea
============  =========  ==========================================================================
none          black-box  the plain prompts (pre-attack rate)
inversion     white-box  embedding inversion: RECE eq. 8 in closed form (K/V edits) or by gradient
unlearndiff   white-box  k discrete prefix tokens minimising the edited model's denoising loss
ringabell     black-box  concept direction from paired prompts + genetic search for its tokens
paraphrase    black-box  prompts that mean the concept without naming it
noise         sampler    probe: start from a real concept image noised to step t (Lu et al. 2025)
inpaint       sampler    probe: the model fills a masked part of a real concept image (RePaint)
completion    white-box  probe: the ORIGINAL model runs the first steps, the edited one finishes
============  =========  ==========================================================================

:func:`erasekit.attacks.asr.run_attacks` runs several and reports ASR, pre-attack rate and cost;
:func:`erasekit.attacks.probes.run_probes` runs the probes at several noise levels / hand-over
points and reports ASR per level with counts and 95% Wilson intervals.
"""

from erasekit.attacks.asr import ConceptJudge, attack_asr, concept_judge, default_prompts, run_attacks
from erasekit.attacks.base import (
    Attack,
    AttackContext,
    AttackOutput,
    AttackResult,
    available_attacks,
    get_attack,
    make_attack_config,
    project_to_vocabulary,
    register_attack,
    run_attack,
    token_vocabulary,
)
from erasekit.attacks.probes import run_probes, steered_images

__all__ = [
    "Attack",
    "AttackContext",
    "AttackOutput",
    "AttackResult",
    "ConceptJudge",
    "attack_asr",
    "available_attacks",
    "concept_judge",
    "default_prompts",
    "get_attack",
    "make_attack_config",
    "project_to_vocabulary",
    "register_attack",
    "run_attack",
    "run_attacks",
    "run_probes",
    "steered_images",
    "token_vocabulary",
]
