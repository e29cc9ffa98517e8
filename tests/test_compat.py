import subprocess
import sys


def test_torchvision_imports_and_transforms_run_beside_cpu_torch():
    code = (
        "import torch\n"
        "from vitlab.compat import import_torchvision\n"
        "tv = import_torchvision()\n"
        "from torchvision.transforms import v2\n"
        "x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)\n"
        "y = v2.RandomHorizontalFlip(p=1.0)(x)\n"
        "assert torch.equal(y, x.flip(-1))\n"
        "print(tv.__version__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("0.28")
