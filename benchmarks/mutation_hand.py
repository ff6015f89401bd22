"""The hand-made mutants of issue #17 that survived the suite then: each is applied to a copy of src/ (never to the
tree itself), its test(s) run, and KILLED / SURVIVED printed with the first assertion line.

    python benchmarks/mutation_hand.py            # all
    python benchmarks/mutation_hand.py CRF        # those whose title contains a word
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
T = "tests/test_mutation_pins.py::"
MUTANTS = [  # (title, file under src/, original text, mutated text, tests)
    ('caa min-max global minimum', 'pole_hf/caa.py',
     'low = flat.min(1, keepdim=True).values',
     'low = flat.min()',
     T + 'test_minmax_normalises_each_map_by_its_own_minimum'),
    ('BOX_THRESHOLD 0.4 -> 0.7', 'pole_hf/caa.py',
     'BOX_THRESHOLD = 0.4',
     'BOX_THRESHOLD = 0.7',
     T + 'test_default_box_threshold_is_clip_es_0_4'),
    ('Sinkhorn column step normalises rows', 'pole_hf/caa.py',
     'transition.div_(transition.sum(0, keepdim=True))',
     'transition.div_(transition.sum(1, keepdim=True))',
     T + 'test_sinkhorn_one_round_by_hand' + " " + T + 'test_sinkhorn_converges_to_a_doubly_stochastic_matrix'),
    ('affinity not squared', 'pole_hf/caa.py',
     'return (transition @ transition).float()',
     'return transition.float()',
     T + 'test_affinity_is_two_random_walk_steps'),
    ('patch grid round instead of ceil', 'pole_hf/image_processing_pole.py',
     'max(1, math.ceil(height * factor / patch))',
     'max(1, round(height * factor / patch))',
     T + 'test_patch_grid_is_rounded_up'),
    ('CRF bilateral colour 3 -> 30', 'pole_hf/masks.py',
     'bi_rgb: float = 3,',
     'bi_rgb: float = 30,',
     T + 'test_crf_defaults_are_clip_es_voc_settings'),
    ('CRF iterations 10 -> 5', 'pole_hf/masks.py',
     'iterations: int = 10,',
     'iterations: int = 5,',
     T + 'test_crf_defaults_are_clip_es_voc_settings'),
    ('CRF bilateral xy 67 -> 80', 'pole_hf/masks.py',
     'bi_xy: float = 67,',
     'bi_xy: float = 80,',
     T + 'test_crf_defaults_are_clip_es_voc_settings'),
    ('CRF pos_w 3 -> 4', 'pole_hf/masks.py',
     'pos_w: float = 3,',
     'pos_w: float = 4,',
     T + 'test_crf_defaults_are_clip_es_voc_settings'),
    ('selection cams= not re-indexed', 'pole_hf/selection.py',
     'return maps[[indices.index(i) for i in scored]]',
     'return maps[: len(scored)]',
     T + 'test_precomputed_cams_follow_the_labels_when_a_single_candidate_label_comes_first'),
    ('loading class-token shape on dim 0 only', 'pole_hf/loading.py',
     'if tuple(tensor.shape) != want:',
     'if tuple(tensor.shape)[:1] != want[:1]:',
     T + 'test_class_tokens_of_another_width_are_refused'),
    ('loading vocabulary check on prefix_ids only', 'pole_hf/loading.py',
     'if name.endswith("_ids") and tensor.numel()',
     'if name.endswith("prefix_ids") and tensor.numel()',
     T + 'test_every_id_buffer_is_checked_against_the_vocabulary'),
    ('loading learn_context context shape unchecked', 'pole_hf/loading.py',
     'want = (tensors["prompt_learner.prefix_ids"].numel() - 1, want[1])',
     'want = tuple(tensor.shape)',
     T + 'test_context_of_another_shape_is_refused'),
    ('loading restores class_tokens only', 'pole_hf/loading.py',
     'if name in params and name != "prompt_learner.context":',
     'if name == "prompt_learner.class_tokens":',
     T + 'test_context_and_adapters_round_trip'),
    ('loading context not restored', 'pole_hf/loading.py',
     'learner.context = torch.nn.Parameter(tensors["prompt_learner.context"].to(device).float())',
     'pass',
     T + 'test_context_and_adapters_round_trip'),
]
only = sys.argv[1:]
work = tempfile.mkdtemp(prefix="pole-hand-mutants-")
for title, rel, old, new, tests in MUTANTS:
    if only and not any(o in title for o in only):
        continue
    dst = os.path.join(work, "src")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("__pycache__"))
    path = os.path.join(dst, rel)
    text = Path(path).read_text()
    assert text.count(old) == 1, (title, text.count(old))
    Path(path).write_text(text.replace(old, new))
    env = dict(os.environ, PYTHONPATH=dst, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", *tests.split()],
                       cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    errors = [l for l in r.stdout.splitlines() if l.startswith("E ")]
    print(f"{'KILLED ' if r.returncode else 'SURVIVED'}  {title}  ({errors[0][:110] if errors else ''})", flush=True)
shutil.rmtree(work, ignore_errors=True)
