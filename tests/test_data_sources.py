"""Document sources: Project Gutenberg stripping, plain-text files, and the Hub's fail-fast check."""

import os
import socket
import subprocess
import sys
import time

import pytest

from fgpt_jax.data.sources import DataError, TextSource, strip_gutenberg

# The real Project Gutenberg markers and header/licence lines (the START marker wrapped over two lines, as in
# Robinson Crusoe, and the licence's two real closing forms), CRLF endings; the book text is synthetic.
HEADER = "The Project Gutenberg EBook of A Test, by Nobody\r\n\r\nThis eBook is for the use of anyone anywhere\r\n\r\n"
LICENCE = (
    "***** This file should be named 1234.txt *****\r\nSection 1. General Terms of Use\r\n"
    "This Web site includes information about Project Gutenberg-tm,\r\nincluding how to make donations "
    "to the Project Gutenberg Literary\r\nArchive Foundation, how to help produce our new eBooks, and how "
    "to\r\nsubscribe to our email newsletter to hear about new eBooks.\r\n"
)
BOOK = (
    HEADER + "*** START OF THIS PROJECT GUTENBERG EBOOK A TEST ***\r\n\r\n\r\n"
    "Chapter I\r\n\r\nIt was a dark night.\r\nThe wind blew.\r\n\r\nChapter II\r\n\r\nMorning came.\r\n"
    "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK A TEST ***\r\n\r\n" + LICENCE
)
BOOK_WRAPPED = (
    "The Project Gutenberg eBook, The Life and Adventures of Robinson Crusoe\r\n"
    "***START OF THE PROJECT GUTENBERG EBOOK THE LIFE AND ADVENTURES OF\r\n"
    "ROBINSON CRUSOE***\r\nI was born.\r\n***END OF THE PROJECT GUTENBERG EBOOK THE LIFE\r\n"
    "Licence\r\nAn alternative method of locating eBooks:\r\n\r\n*** END: FULL LICENSE ***\r\n"
)
BODY = "Chapter I\n\nIt was a dark night.\nThe wind blew.\n\nChapter II\n\nMorning came."


def _lf(text: str) -> str:
    return text.replace("\r\n", "\n")  # what TextSource reads (universal newlines)


@pytest.fixture
def books(tmp_path):
    d = tmp_path / "books"
    d.mkdir()
    (d / "a.txt").write_bytes(BOOK.encode())
    (d / "b.txt").write_bytes(BOOK_WRAPPED.encode())
    (d / "c.txt").write_bytes(("Plain text, no markers.\n\n" * 400).encode())
    return d


def test_gutenberg_stripping(books):
    docs = [t for _, t in TextSource([str(books / "a.txt"), str(books / "b.txt")])]
    assert docs == [BODY, "I was born."]
    assert strip_gutenberg("no markers\n") == ("no markers\n", 0)
    blocks = [t for _, t in TextSource([str(books / "a.txt")], blocks=True)]
    assert blocks == ["Chapter I", "It was a dark night.\nThe wind blew.", "Chapter II", "Morning came."]
    kept = [t for _, t in TextSource([str(books / "a.txt")], gutenberg=False)]
    assert "General Terms of Use" in kept[0]
    with pytest.raises(DataError, match="nope.txt: file not found"):
        TextSource([str(books / "nope.txt")])
    (books / "bad.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="bad.txt: expected UTF-8"):
        list(TextSource([str(books / "bad.txt")]))


def test_gutenberg_strips_only_the_pair_and_keeps_other_text():
    """Issue 13.7: one book followed by other text lost the other text (60% of the tokens)."""
    other = "".join(f"Appendix line {i}: text that is not part of the book.\n" for i in range(60))
    text, removed = strip_gutenberg(_lf(BOOK) + "\n" + other)
    assert text == BODY + "\n\n" + other.rstrip("\n")
    assert removed == len(_lf(BOOK)) - len(BODY) - 4  # all but the body and the 4 blank lines framing it
    # Text before the header is kept; each of two books in one file loses exactly its own header and licence.
    text, _ = strip_gutenberg("Preface by the collector.\n\n" + _lf(BOOK) + _lf(BOOK_WRAPPED))
    assert text == "Preface by the collector.\n\n" + BODY + "\n\nI was born."
    # Without a matched pair nothing is stripped, not even an unmatched START's header.
    start_only = _lf(BOOK).split("*** END OF")[0]
    assert strip_gutenberg(start_only) == (start_only, 0)
    # No recognised closing line and more after END than a licence: only the END line goes.
    long_tail = _lf(BOOK).replace("hear about new eBooks.", "hear about it.") + "More text.\n" * 5000
    text, removed = strip_gutenberg(long_tail)
    assert text.startswith(BODY + "\n\n***** This file") and text.endswith("More text.")
    assert removed == len(_lf(HEADER)) + len("*** START OF THIS PROJECT GUTENBERG EBOOK A TEST ***\n") + len(
        "*** END OF THIS PROJECT GUTENBERG EBOOK A TEST ***\n"
    )


def test_text_source_reports_what_it_stripped(books):
    src = TextSource([str(books)])
    docs = [t for _, t in src]
    assert len(docs) == 3
    a, b = str(books / "a.txt"), str(books / "b.txt")
    assert set(src.stripped) == {a, b}  # c.txt has no markers: nothing stripped, nothing reported
    assert src.stripped[a] == (len(_lf(BOOK)) - len(BODY) - 4, len(_lf(BOOK)))
    assert TextSource([str(books)], gutenberg=False).stripped == {}


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: connecting is refused at once, on this machine only
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "ENDPOINT"}], ids=["offline", "unreachable"])
def test_hub_unreachable_fails_fast_and_suggests_files(tmp_path, env):
    """Offline or unreachable Hub: one line suggesting --files within seconds (it retried for ~23 s), nothing
    written. Never touches the network: offline mode, or an endpoint on a closed local port."""
    env = {k: (f"http://127.0.0.1:{_closed_port()}" if v == "ENDPOINT" else v) for k, v in env.items()}
    base = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "HF_HUB_OFFLINE",
            "HF_DATASETS_OFFLINE",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        )
    }
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "fgpt_jax.data", "fineweb", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        env={**base, "HF_HUB_DISABLE_TELEMETRY": "1", **env},
    )
    elapsed = time.perf_counter() - t0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: --repo HuggingFaceFW/fineweb-edu: ") and "--files" in lines[0]
    assert elapsed < 15 and not out.exists()


def test_text_cli_reports_stripping_per_file(books, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgpt_jax.data",
            "text",
            str(books),
            "--out",
            str(tmp_path / "out"),
            "--val-fraction",
            "0",
            "--workers",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    lines = sorted(line for line in r.stderr.splitlines() if line.strip())
    n = len(_lf(BOOK))
    assert lines == [
        f"{books / 'a.txt'}: stripped Project Gutenberg header and licence: {n - len(BODY) - 4:,} of "
        f"{n:,} characters ({(n - len(BODY) - 4) / n:.1%}; --keep-gutenberg keeps them)",
        f"{books / 'b.txt'}: stripped Project Gutenberg header and licence: "
        f"{len(_lf(BOOK_WRAPPED)) - len('I was born.') - 1:,} of {len(_lf(BOOK_WRAPPED)):,} characters "
        f"({(len(_lf(BOOK_WRAPPED)) - len('I was born.') - 1) / len(_lf(BOOK_WRAPPED)):.1%}; "
        f"--keep-gutenberg keeps them)",
    ]
