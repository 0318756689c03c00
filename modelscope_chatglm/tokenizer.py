"""ChatGLM tokenizers, directly over `sentencepiece` (docs/formats.md §4).

No transformers base class: their internals changed under the reference tokenizers three times
(4.34, 4.45, 5.x). Each tokenizer here is a SentencePiece model plus a short list of special tokens.

- GLM2Tokenizer: `tokenizer.model` + 5 specials appended after the SP pieces
  ([MASK] [gMASK] [sMASK] sop eop). Decoding blanks every special.
- GLM3Tokenizer: the same + the 4 role tokens (<|system|> <|user|> <|assistant|> <|observation|>).
  Decoding renders specials as their text, which the chat post-processing relies on.
- GLM1Tokenizer: `ice_text.model`, whitespace pre-processing, specials inside the SP model.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, List

import sentencepiece

from .errors import CheckpointError, InputError
from .model_config import read_json


def _load_sp(path: str) -> sentencepiece.SentencePieceProcessor:
    if not os.path.exists(path):
        raise CheckpointError(f'{path} is missing: the tokenizer model must sit next to config.json')
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f'{path} is not a valid SentencePiece model ({e}); download it again') from None
    return sp


def _checked(text) -> str:
    """Text SentencePiece can take: a str of Unicode scalar values (no lone surrogates)."""
    if not isinstance(text, str):
        raise TypeError(f'encode() takes a str, got {type(text).__name__}')
    try:
        text.encode('utf-8')
    except UnicodeEncodeError as e:
        raise InputError(f'the text is not valid Unicode: it holds {e.object[e.start:e.end]!r}, a lone surrogate '
                         '(half of a UTF-16 pair); send well-formed text') from None
    return text


def piece_bytes(sp, i: int) -> bytes:
    """The bytes one SentencePiece piece stands for: a byte piece its byte, a control piece none, any
    other its text with the word-boundary mark as a space."""
    if sp.IsByte(i):
        return bytes([int(sp.IdToPiece(i)[3:5], 16)])   # '<0xE4>'
    if sp.IsControl(i):
        return b''
    if sp.IsUnknown(i):
        return ' \u2047 '.encode('utf-8')   # how SentencePiece decodes it
    return sp.IdToPiece(i).replace('\u2581', ' ').encode('utf-8')


def unfinished_char(text: str) -> int:
    """How many characters at the end of decoded text are the bytes of a character whose other bytes
    have not come yet. SentencePiece decodes each such byte as U+FFFD, and a UTF-8 character has at
    most 4 bytes, so at most the last 3 U+FFFD can still change."""
    n = 0
    while n < 3 and n < len(text) and text[-1 - n] == '\ufffd':
        n += 1
    return n


class GLM2Tokenizer:
    """ChatGLM2-6B tokenizer. Ids of plain text are SentencePiece ids; specials follow them."""

    SPECIAL_TOKENS = ('[MASK]', '[gMASK]', '[sMASK]', 'sop', 'eop')

    @classmethod
    def from_dir(cls, model_dir: str, config) -> 'GLM2Tokenizer':
        return cls(os.path.join(model_dir, 'tokenizer.model'))

    def __init__(self, model_file: str):
        self.model_file = model_file
        self.sp = _load_sp(model_file)
        self.num_sp_pieces = self.sp.GetPieceSize()
        self.special_ids: Dict[str, int] = {
            token: self.num_sp_pieces + i for i, token in enumerate(self.SPECIAL_TOKENS)}
        self.special_tokens: Dict[int, str] = {i: t for t, i in self.special_ids.items()}
        self.vocab_size = self.num_sp_pieces + len(self.SPECIAL_TOKENS)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.unk_id()   # ChatGLM2 pads with <unk> (id 0)

    def __getitem__(self, token: str) -> int:
        """Id of a special token, e.g. `tok['[gMASK]']`."""
        return self.special_ids[token]

    @property
    def prefix_ids(self) -> List[int]:
        """What the model expects before any prompt: [gMASK] sop."""
        return [self['[gMASK]'], self['sop']]

    @property
    def stop_ids(self) -> List[int]:
        return [self.eos_id]

    def encode(self, text: str) -> List[int]:
        """Ids of plain text, without the [gMASK]/sop prefix."""
        return self.sp.EncodeAsIds(_checked(text))

    def decode(self, ids: Iterable[int]) -> str:
        drop = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.DecodeIds([int(i) for i in ids
                                  if int(i) < self.num_sp_pieces and int(i) not in drop and int(i) >= 0])

    def unsettled_chars(self, text: str) -> int:
        """How many characters at the end of decode(ids) the next tokens could still change."""
        return unfinished_char(text)

    def token_bytes(self, i: int) -> bytes:
        """What one token adds to the text (a first piece's leading space included), as bytes: a byte
        piece is one byte of a character."""
        if 0 <= i < self.num_sp_pieces and i not in (self.bos_id, self.eos_id, self.pad_id):
            return piece_bytes(self.sp, i)
        return b''   # as decode: specials, bos, eos and padding are blank


class GLM3Tokenizer(GLM2Tokenizer):
    """ChatGLM3-6B tokenizer: GLM2's plus role tokens; specials decode to their text."""

    SPECIAL_TOKENS = GLM2Tokenizer.SPECIAL_TOKENS + (
        '<|system|>', '<|user|>', '<|assistant|>', '<|observation|>')

    @property
    def stop_ids(self) -> List[int]:
        return [self.eos_id, self['<|user|>'], self['<|observation|>']]

    def decode(self, ids: Iterable[int]) -> str:
        text, run = [], []
        for i in (int(i) for i in ids):
            if i in self.special_tokens:
                text.append(self.sp.DecodeIds(run))
                text.append(self.special_tokens[i])
                run = []
            elif 0 <= i < self.num_sp_pieces:
                run.append(i)
        text.append(self.sp.DecodeIds(run))
        return ''.join(text)

    def token_bytes(self, i: int) -> bytes:
        if i in self.special_tokens:
            return self.special_tokens[i].encode('utf-8')   # specials decode to their text here
        return piece_bytes(self.sp, i) if 0 <= i < self.num_sp_pieces else b''

    def encode_message(self, role: str, content: str, metadata: str = '') -> List[int]:
        """One chat message: <|role|> metadata \\n content (docs/formats.md §4.3)."""
        return [self[f'<|{role}|>']] + self.encode(f'{metadata}\n') + self.encode(content)


class GLM1Tokenizer:
    """ChatGLM-6B `ice_text.model` tokenizer (docs/formats.md §4.1).

    Newlines, tabs and runs of spaces are rewritten to placeholder pieces before SentencePiece sees
    the text, and back after decoding. [gMASK], <sop>, <eop> live inside the SP model.
    """

    MAX_BLANK = 80

    @classmethod
    def from_dir(cls, model_dir: str, config) -> 'GLM1Tokenizer':
        """`ice_text.model`, its id offset from tokenizer_config.json, checked against the special ids
        in config.json."""
        tok_cfg_path = os.path.join(model_dir, 'tokenizer_config.json')
        num_image_tokens = 20000   # the class default of the pre-slim tokenizer (docs/formats.md §1.1)
        if os.path.exists(tok_cfg_path):
            num_image_tokens = int(read_json(tok_cfg_path).get('num_image_tokens', 20000))
        tok = cls(os.path.join(model_dir, 'ice_text.model'), num_image_tokens)
        expect = {'[MASK]': config.mask_token_id, '[gMASK]': config.gmask_token_id,
                  '<sop>': config.bos_token_id, '<eop>': config.eos_token_id}
        wrong = {t: (tok[t], i) for t, i in expect.items() if i is not None and tok[t] != i}
        if wrong:
            raise CheckpointError(
                f'{tok.model_file} and {os.path.join(model_dir, "config.json")} disagree on special ids '
                f'(token: tokenizer id, config id) {wrong}; check num_image_tokens in tokenizer_config.json '
                'or use the tokenizer from the same model revision')
        return tok

    def __init__(self, model_file: str, num_image_tokens: int = 0):
        self.model_file = model_file
        self.sp = _load_sp(model_file)
        self.num_sp_pieces = self.sp.GetPieceSize()
        self.offset = num_image_tokens
        self.vocab_size = self.num_sp_pieces + num_image_tokens
        ids = {t: self.sp.PieceToId(t) + num_image_tokens for t in ('[MASK]', '[gMASK]', '<sop>', '<eop>')}
        self.special_ids = ids
        self.bos_id, self.eos_id = ids['<sop>'], ids['<eop>']
        self.pad_id = self.sp.pad_id() + num_image_tokens if self.sp.pad_id() >= 0 else 3
        self._blank_re = re.compile(r' {2,%d}' % self.MAX_BLANK)
        # Only the placeholders the reference restores (2 to 80 spaces): the model can spell
        # '<|blank_1|>' or '<|blank_99999999999|>' piece by piece, and those stay text.
        self._placeholder_re = re.compile(r'<n>|<\|tab\|>|<\|blank_([2-9]|[1-7][0-9]|80)\|>')

    def __getitem__(self, token: str) -> int:
        return self.special_ids[token]

    @property
    def prefix_ids(self) -> List[int]:
        return []

    @property
    def suffix_ids(self) -> List[int]:
        return [self['[gMASK]'], self['<sop>']]

    @property
    def stop_ids(self) -> List[int]:
        return [self.eos_id]

    def _preprocess(self, text: str) -> str:
        text = text.replace('\n', '<n>').replace('\t', '<|tab|>')
        # Greedy left-to-right runs of up to 80 spaces: 85 spaces -> <|blank_80|> + <|blank_5|>.
        return self._blank_re.sub(lambda m: f'<|blank_{len(m.group())}|>', text)

    def encode(self, text: str) -> List[int]:
        return [i + self.offset for i in self.sp.EncodeAsIds(self._preprocess(_checked(text)))]

    def decode(self, ids: Iterable[int]) -> str:
        pieces = [int(i) - self.offset for i in ids]
        pieces = [i for i in pieces if 0 <= i < self.num_sp_pieces and i + self.offset != self.pad_id]
        return self._placeholder_re.sub(self._restore, self.sp.DecodeIds(pieces))

    @staticmethod
    def _restore(m) -> str:
        """A placeholder -> the whitespace it stands for."""
        if m.group() == '<n>':
            return '\n'
        if m.group() == '<|tab|>':
            return '\t'
        return ' ' * int(m.group(1))

    def token_bytes(self, i: int) -> bytes:
        piece = i - self.offset
        if not 0 <= piece < self.num_sp_pieces or i == self.pad_id:
            return b''
        return self._placeholder_re.sub(self._restore, piece_bytes(self.sp, piece).decode(
            'utf-8', 'surrogateescape')).encode('utf-8', 'surrogateescape')

    def unsettled_chars(self, text: str) -> int:
        """How many characters at the end of decode(ids) the next tokens could still change: an
        unfinished character, or the start of a placeholder ('<', '<|bla', '<|blank_8|', spelled by
        several pieces) that decoding would turn into whitespace once complete."""
        start = text.rfind('<', max(0, len(text) - 11))   # '<|blank_80|' is the longest start
        tail = text[start:] if start >= 0 else ''
        partial = tail and ('<n>'.startswith(tail) or '<|tab|>'.startswith(tail)
                            or '<|blank_'.startswith(tail) or re.fullmatch(r'<\|blank_\d\d?\|?', tail))
        return max(unfinished_char(text), len(tail) if partial else 0)
