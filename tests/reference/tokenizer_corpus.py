"""Text for the tokenizer reference test and benchmark: a real corpus nobody here wrote (the
gzip'd documentation and manual pages of this machine's Debian packages, a deterministic file
list) cut into chunks of raw bytes, and adversarial strings. Raw bytes: our tokenizer gets them
as they are, `tokenizers` gets bytes.decode("utf-8", errors="replace")."""
import glob
import gzip

CHUNK_BYTES = 4000


def _files():
    doc = sorted(glob.glob("/usr/share/doc/**/*.gz", recursive=True))
    man = sorted(glob.glob("/usr/share/man/**/*.gz", recursive=True))
    return doc, man


def _chunks(data):
    """Cuts at line ends into pieces of at most about CHUNK_BYTES (a longer line stays whole)."""
    out, start = [], 0
    while start < len(data):
        end = min(len(data), start + CHUNK_BYTES)
        if end < len(data):
            nl = data.rfind(b"\n", start, end)
            end = nl + 1 if nl > start else end
        out.append(data[start:end])
        start = end
    return out


def corpus_texts(min_bytes=5_000_000):
    """Chunks of at least min_bytes in total: every 23rd doc and every 7th man file (sorted
    paths), alternating, as far as needed (the man pages hold many languages; some files are
    Latin-1, i.e. invalid UTF-8)."""
    doc, man = _files()
    texts, total = [], 0
    for i in range(max(len(doc), len(man))):
        for files, step in ((doc, 23), (man, 7)):
            if i % step or i >= len(files):
                continue
            try:
                data = gzip.open(files[i]).read()
            except (OSError, EOFError):
                continue
            texts += _chunks(data)
            total += len(data)
        if total >= min_bytes:
            break
    return texts


ADDED_PROBES = ["<|im_start|>", "<|sep|>", "[MASK]", "hello world", "<br>"]


def adversarial_texts():
    """Mixed scripts, emoji and ZWJ sequences, combining marks, digits, whitespace runs, strings
    touching added tokens, and invalid UTF-8 (as bytes)."""
    s = [
        "Hello, world! It's a test; we'll see: they've, I'm, you'd, she'd've.",
        "日本語のテキストと中文文本，还有한국어 텍스트.",
        "العربية نص مع أرقام ١٢٣٤٥ و 12345.",
        "हिन्दी पाठ और संख्या १२३४५ तथा क्षत्रिय।",
        "Русский текст, ЁЖИК и ёжик; Українська ґ.",
        "Ελληνικά: ΣΊΣΥΦΟΣ σίσυφος, İstanbul ıi KELVIN \u212a.",
        "emoji 😀😃🇩🇪🇯🇵 family 👨\u200d👩\u200d👧\u200d👦 skin 👍🏽 keycap 1\ufe0f\u20e3 ❤️\u200d🔥",
        "combining: e\u0301 a\u0308 o\u0302\u0323 Z\u0335\u0321\u031b\u0328 q\u0307\u0323 n\u0303",
        "precomposed é ä ô and decomposed e\u0301 a\u0308; ligatures ﬁ ﬂ ﬀ; ½ ² ³ ℌ ㎏ ｆｕｌｌｗｉｄｔｈ",
        "digits 0 12 345 6789 1234567890123456789012345678901234567890 3.14159 1,000,000",
        "long 00000000000000000000000000000000000000000000000000000000000000000",
        "spaces  two   three    four     five\t\ttabs\n\nnewlines\r\n\r\nCRLF   \n  \t \n",
        "nbsp\u00a0\u00a0here\u2003em\u3000ideographic\u2009thin\u202fnarrow\u205fmath\u0085nel\u2028ls\u2029ps",
        "   leading and trailing spaces   ",
        "\n\n\n",
        " ",
        "",
        "a",
        "tab\tsep\tvalues\t1\t2\t3\n",
        "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
        "mixed日本English한국어Русский123abc!!!???...---",
        "punctuation!!! ??? ... --- ((( ))) [[[ ]]] {{{ }}} @@@ ### $$$ %%% ^^^ &&& *** ~~~",
        "code: def f(x):\n    return x**2  # comment\n\tif a != b and c >= d: pass",
        "url https://example.com/path?q=1&r=two#frag email a.b@c.de",
        "'s 'S 'RE 'Ve 'LL 'd 'm 'x ''' \"quoted\"",
        "\u017fs long-s and \u212a Kelvin under (?i:)",
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
        "x<|sep|>y", "  <|sep|>  z", "a <|sep|>\n\nb", "<|sep|><|sep|>", "[MASK][MASK]",
        "a [MASK] b", "a   [MASK]   b", "\t[MASK]\n", "hello world", "hello worldly", "ahello world",
        "say hello world!", "hello  world", "Hello World", "<br>line<br> <br>\n", "<|im_start",
        "<|im_start|", "<<|im_start|>>", "<|endoftext|>", "text<|endoftext|>more",
        "▁already▁has▁metaspace ▁ ▁▁", "<0x41> <0xZZ> <0x0A>", "<unk> <s> </s>",
    ]
    texts = [t.encode("utf-8") for t in s]
    texts += [
        b"invalid \xff byte", b"truncated \xe6\x97 seq", b"\xc0\xaf overlong", b"\xed\xa0\x80 surrogate",
        b"\xf4\x90\x80\x80 too big", b"lone cont \x80\x80\x80 end", b"\xf0\x9f\x98 cut emoji",
        b"mix \xe2\x82\xac ok \xe2\x82 bad \xe2 \xff\xfe", b"\xff", b"\xe6\x97\xa5\xe6\x9c",
        b"latin-1: caf\xe9 na\xefve \xa0nbsp", b"ends with \xc3",
    ]
    # The probes for added tokens glued to every script above.
    for i, t in enumerate(s[:12]):
        texts.append((ADDED_PROBES[i % len(ADDED_PROBES)] + t + ADDED_PROBES[(i + 2) % len(ADDED_PROBES)]).encode())
    return texts
