"""The SentencePiece tokenizers on real (tiny, trained) models: edge cases and special tokens."""
import pytest

EDGE_CASES = [
    '你好', 'hello world', ' leading space', 'trailing   ', 'a  b   c    d', ' ' * 2, ' ' * 85,
    'tab\there', '\t\t\tindented', 'line1\nline2', '\n\n\n', 'crlf\r\nline', '👋 emoji 😀🎉',
    '全角，标点！：；？（）【】', '。、“引号”', 'mixed中英文ABC123混合', 'x=1; y = [1, 2]  # code',
    '\u3000ideographic space', 'zero\u200bwidth', 'ÀÉÎõü accents', '',
]


@pytest.mark.parametrize('text', EDGE_CASES)
def test_roundtrip_is_exact(glm2_model, glm3_model, text):
    for model in (glm2_model, glm3_model):
        ids = model.tokenizer.encode(text)
        assert model.tokenizer.decode(ids) == text
        assert all(0 <= i < model.tokenizer.num_sp_pieces for i in ids)


def test_byte_fallback_and_layout(glm2_model):
    tok = glm2_model.tokenizer
    # Byte pieces sit at 3..258 as in the real tokenizer: '\n' = 13, '\t' = 12.
    assert tok.sp.PieceToId('<0x0A>') == 13 and tok.sp.PieceToId('<0x09>') == 12
    assert 13 in tok.encode('a\nb')
    assert tok.decode(tok.encode('🦜')) == '🦜'    # not in the training text: bytes


def test_glm2_specials(glm2_model):
    tok = glm2_model.tokenizer
    n = tok.num_sp_pieces
    assert [tok[t] for t in ('[MASK]', '[gMASK]', '[sMASK]', 'sop', 'eop')] == list(range(n, n + 5))
    assert tok.prefix_ids == [n + 1, n + 3]
    assert tok.vocab_size == n + 5 and tok.stop_ids == [2]
    # v2 decoding blanks specials, bos, eos and pad.
    assert tok.decode(tok.prefix_ids + tok.encode('你好') + [2, 0, 1]) == '你好'


def test_glm3_role_tokens(glm3_model):
    tok = glm3_model.tokenizer
    n = tok.num_sp_pieces
    roles = ['<|system|>', '<|user|>', '<|assistant|>', '<|observation|>']
    assert [tok[r] for r in roles] == list(range(n + 5, n + 9))
    assert tok.stop_ids == [2, tok['<|user|>'], tok['<|observation|>']]
    # v3 renders specials as their text (the chat post-processing splits on <|assistant|>).
    assert tok.decode([tok['<|assistant|>']] + tok.encode('你好')) == '<|assistant|>你好'
    # Role-token text typed by a user stays text: it cannot forge a turn boundary.
    forged = tok.encode('<|user|>')
    assert tok['<|user|>'] not in forged and tok.decode(forged) == '<|user|>'


def test_encode_rejects_non_strings(glm2_model):
    with pytest.raises(TypeError, match='takes a str'):
        glm2_model.tokenizer.encode(['a'])


def _streamed(tok, ids):
    """The text deltas of a reply, token by token, then the held-back rest."""
    from modelscope_chatglm.engine.detokenize import TextDeltas
    deltas = TextDeltas(tok)
    out = [deltas.push(i) for i in ids]
    return out + [deltas.flush()]


def _hostile_pieces(tok):
    """Pieces that decode to text a later piece changes: UTF-8 lead and continuation bytes, and
    (ChatGLM-6B) the characters of its whitespace placeholders."""
    pieces = [tok.sp.PieceToId('<0x%02X>' % b) for b in list(range(0x80, 0xC0, 5)) + list(range(0xC2, 0xF5))]
    if hasattr(tok, 'offset'):
        pieces = [i + tok.offset for i in pieces]
        pieces += [i + tok.offset for i in tok.sp.EncodeAsIds('<|blank_8|>< n |tab|>') if i]
    return pieces


def test_streamed_deltas_add_up_to_the_decoded_reply(glm1_model, glm2_model, glm3_model):
    """Random replies heavy in byte pieces and placeholder characters: the deltas always concatenate to
    the whole reply decoded at once, and never lag it by more than a held-back tail."""
    import random
    rng = random.Random(0)
    for model in (glm1_model, glm2_model, glm3_model):
        tok = model.tokenizer
        hostile = _hostile_pieces(tok)
        for _ in range(150):
            pool = hostile + [rng.randrange(tok.vocab_size) for _ in range(len(hostile))]
            ids = [rng.choice(pool) for _ in range(rng.randrange(1, 150))]
            deltas = _streamed(tok, ids)
            assert ''.join(deltas) == tok.decode(ids), ids
            for k in range(len(ids)):
                assert len(tok.decode(ids[:k + 1])) - len(''.join(deltas[:k + 1])) <= 11, ids[:k + 1]


def test_a_placeholder_spelled_piece_by_piece_streams_once(glm1_model):
    """'<', 'n', '>' from the model decode to a newline once complete. The stream sent '<' and 'n'
    first, then saw text that no longer began with what it had sent and sent the whole reply again."""
    tok = glm1_model.tokenizer
    hi = tok.encode('hi')
    spelled = [tok.sp.PieceToId(p) + tok.offset for p in ('<0x3C>', 'n', '<0x3E>')]
    ids = hi + spelled + hi
    assert tok.decode(ids) == 'hi\n hi'
    deltas = _streamed(tok, ids)
    assert ''.join(deltas) == 'hi\n hi'
    assert deltas[len(hi):len(hi) + 2] == ['', '']     # '<' and '<n' held back


def test_streaming_decodes_a_bounded_window(glm2_model):
    """Each token decodes a window of the latest tokens, however long the reply: the whole reply each
    time made streaming quadratic in its length."""
    from modelscope_chatglm.engine.detokenize import TextDeltas
    tok = glm2_model.tokenizer
    lengths = []

    class Counting:
        def decode(self, ids):
            lengths.append(len(ids))
            return tok.decode(ids)

        def unsettled_chars(self, text):
            return tok.unsettled_chars(text)

    ids = tok.encode('你好，世界 hello world 🦜 ' * 200)
    invalid = [tok.sp.PieceToId('<0xE4>')] * 300   # bytes that never finish a character, held back
    deltas = TextDeltas(Counting())
    text = ''.join(deltas.push(i) for i in ids + invalid) + deltas.flush()
    assert text == tok.decode(ids + invalid) and len(ids) > 2000
    assert max(lengths) <= 2 * TextDeltas.CONTEXT
