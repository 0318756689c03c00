"""The README and docs/ say what users type: every shell block there runs here, as written.

A block that CI cannot run says why on the line before it, `<!-- not run in CI: REASON -->`, and the reason
must start with one CI really lacks (a GPU, the network, ...), details may follow. Blocks of one file run in order in one temp dir,
so a later block may use what an earlier one built. Links between the documents must resolve.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md')) + [ROOT / 'benchmarks' / 'README.md']
SKIP = re.compile(r'<!-- not run in CI: (.+?) -->')
# What CI does not have. A block skipped for any other reason is a block that should run.
REASONS = ('needs a GPU', 'needs the network', 'installs from the package index', 'this is CI',
           'starts a Ray cluster')
FENCE = re.compile(r'^```(\w*)\s*$')


def shell_blocks(path: Path):
    """[(line number, code, reason it is not run or None)] for each bash/sh block of a markdown file."""
    lines = path.read_text(encoding='utf-8').split('\n')
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith('```'))
        if m.group(1) in ('bash', 'sh', 'shell'):
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), '')
            skip = SKIP.search(before)
            blocks.append((i + 1, '\n'.join(lines[i + 1:end]), skip.group(1) if skip else None))
        i = end + 1
    return blocks


def run_block(code: str, cwd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one block with bash -e in its own process group, with the installed package's python and
    console scripts first on PATH; whatever it leaves running is killed afterwards."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    proc = subprocess.Popen(['bash', '-euo', 'pipefail', '-c', code], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f'\n(timed out after {timeout} s)'
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shell_block_runs_or_says_why_not(doc):
    with tempfile.TemporaryDirectory(prefix='docs-') as cwd:
        for line, code, reason in shell_blocks(doc):
            if reason is not None:
                assert reason.startswith(REASONS), (f'{doc.name}:{line}: "{reason}" is not a reason CI lacks; start '
                                                    f'it with one of {REASONS}, or make the block run')
                continue
            result = run_block(code, cwd)
            assert result.returncode == 0, f'{doc.name}:{line} failed:\n{code}\n---\n{result.stdout[-3000:]}'


def test_the_readme_has_runnable_blocks_and_the_harness_catches_a_failing_one(tmp_path):
    runnable = [b for b in shell_blocks(ROOT / 'README.md') if b[2] is None]
    assert runnable, 'the README shows no command that CI runs'
    doc = tmp_path / 'x.md'
    doc.write_text('text\n\n```bash\necho one\nfalse\necho never\n```\n\n<!-- not run in CI: needs a GPU -->\n'
                   '```bash\nnvidia-smi\n```\n')
    (first, code, reason), (_, _, second_reason) = shell_blocks(doc)
    assert (first, reason, second_reason) == (3, None, 'needs a GPU')
    result = run_block(code, str(tmp_path))
    assert result.returncode != 0 and 'one' in result.stdout and 'never' not in result.stdout


LINK = re.compile(r'\]\(([^)#\s]+)(#[^)\s]*)?\)')


def anchors(path: Path):
    """GitHub's anchors for a markdown file's headings."""
    out = set()
    for line in path.read_text(encoding='utf-8').split('\n'):
        if line.startswith('#'):
            title = line.lstrip('#').strip().lower()
            out.add('#' + re.sub(r'[^\w\- ]', '', title).replace(' ', '-'))
    return out


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_between_the_documents_resolve(doc):
    text = doc.read_text(encoding='utf-8')
    for target, anchor in LINK.findall(text):
        if target.startswith(('http://', 'https://', 'mailto:')):
            continue
        path = (doc.parent / target).resolve()
        assert path.exists(), f'{doc.name} links to {target}, which does not exist'
        if anchor and path.suffix == '.md':
            assert anchor in anchors(path), f'{doc.name} links to {target}{anchor}: no such heading'
    for anchor in re.findall(r'\]\((#[^)\s]+)\)', text):
        assert anchor in anchors(doc), f'{doc.name} links to {anchor}: no such heading'
