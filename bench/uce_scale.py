"""UCE's erase/preserve scales and lambda on the miniature: ESR-1 / PSR-1 for one erased object.

Usage: python bench/uce_scale.py [OBJECT] [N_PER_CLASS]   (seeds 100.. are held out from the demo's 0..19)
"""

import sys

import erasekit
from erasekit.demo import demo_templates
from erasekit.eval.detectors import load_detector
from erasekit.eval.protocols import evaluate
from erasekit.world.shapes import OBJECTS


def main() -> None:
    concept = sys.argv[1] if len(sys.argv) > 1 else "triangle"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    pipe = erasekit.load_pipeline("shapes")
    det = load_detector("shapes")
    preserve = [o for o in OBJECTS if o != concept]
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    print(f"{'erase_scale':>11} {'preserve_scale':>14} {'lamb':>5} {'ESR-1':>6} {'PSR-1':>6}")
    for es, ps, lam in [(1, 1, 0.5), (3, 1, 0.5), (10, 1, 0.5), (1, 0.3, 0.5), (1, 1, 0.1)]:
        request = erasekit.EraseRequest([concept], preserve=preserve)
        edit = erasekit.erase(
            pipe, request, method="uce", templates=demo_templates(), erase_scale=es, preserve_scale=ps, lamb=lam
        )
        edit.apply_(pipe)
        r = evaluate(pipe, "shapes-objects", erase=[concept], n_per_class=n, detector=det, progress=False, seed=100)
        print(f"{es:>11} {ps:>14} {lam:>5} {100 * r['esr_1']:>5.1f}% {100 * r['psr_1']:>5.1f}%", flush=True)
        pipe.unet.load_state_dict(original)


if __name__ == "__main__":
    main()
