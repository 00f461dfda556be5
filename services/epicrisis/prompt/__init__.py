"""The Med42-v2 prompt for one stay: linearized, cited, token-budgeted, and its verifier.

``build_messages(stay, tokenizer=..., max_input_tokens=...)`` gives the chat messages;
``verify_answer(answer, prompt, stay)`` checks the model's cited prose against them.
"""

from epicrisis.prompt.budget import (
    DEFAULT_MAX_INPUT_TOKENS,
    MODEL_CONTEXT_TOKENS,
    OUTPUT_RESERVE_TOKENS,
    Omission,
)
from epicrisis.prompt.handles import HandleMap, is_handle
from epicrisis.prompt.linearize import Line, Linearized, linearize
from epicrisis.prompt.messages import (
    CHAT_TOKENS_FIXED,
    CHAT_TOKENS_PER_MESSAGE,
    MED42_SYSTEM_PROMPT,
    SYSTEM_MESSAGE,
    ChatMessage,
    PromptResult,
    build_messages,
    chat_overhead,
)
from epicrisis.prompt.schema import ANSWER_SCHEMA, Answer, Sentence, answer_schema
from epicrisis.prompt.tokenizers import (
    ESTIMATE_UNDERCOUNT_MARGIN,
    EstimateTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)
from epicrisis.prompt.verify import CitedSentence, Problem, Verification, verify_answer

__all__ = [
    "ANSWER_SCHEMA",
    "CHAT_TOKENS_FIXED",
    "CHAT_TOKENS_PER_MESSAGE",
    "DEFAULT_MAX_INPUT_TOKENS",
    "ESTIMATE_UNDERCOUNT_MARGIN",
    "MED42_SYSTEM_PROMPT",
    "MODEL_CONTEXT_TOKENS",
    "OUTPUT_RESERVE_TOKENS",
    "SYSTEM_MESSAGE",
    "Answer",
    "ChatMessage",
    "CitedSentence",
    "EstimateTokenizer",
    "HFTokenizer",
    "HandleMap",
    "Line",
    "Linearized",
    "Omission",
    "Problem",
    "PromptResult",
    "Sentence",
    "Tokenizer",
    "Verification",
    "answer_schema",
    "build_messages",
    "chat_overhead",
    "is_handle",
    "linearize",
    "load_tokenizer",
    "verify_answer",
]
