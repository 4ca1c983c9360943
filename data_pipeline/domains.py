"""Domain classification: a cheap content-type pass first, then a classifier for the rest.

1. Content first (`domains.content_first`): the filter stage's content type (`steps/content.py`:
   file extensions, code fences, code-line shapes, LaTeX and equations) sends code to "code" and
   math to "math". Embeddings of prose-trained sentence encoders place code by its comments and
   identifiers (a Flask app lands in "technology", a pandas script in "finance"), so before this
   pass only 13% of code documents were labelled code.
2. The rest, by `domains.backend`:
   - "embedding" with `student: true` (default): a linear classifier on static embeddings, trained by
     the `train_domains` stage on the zero-shot MiniLM labels of a sample (`domain_student.py`);
   - "embedding" with `student: false`: zero-shot MiniLM (cosine to the label descriptions) on every
     document (~15 docs/s per core: fine for thousands of documents, not for a corpus);
   - "distilled": a classifier trained on the LLM judge's labels (train_scorer stage);
   - "judge": the LLM judge on every document.
3. Non-English documents (`domains.multilingual: e5`, the default): the encoders above are English
   (MiniLM's WordPiece vocabulary; before this pass German, Spanish, Russian and Chinese health /
   news / science / technology pages were labelled 0% right). A document whose langid language is
   neither "en" nor "und" is labelled zero-shot by multilingual-e5-small (`embed.MultilingualEncoder`,
   cosine of the "passage" to each "query: name: description"): 99% right on the 18 non-English
   accepted languages of `samples/domain_text_multilingual.json` (benchmarks/RESULTS.md). English
   documents keep the path above, unchanged.
"""

from __future__ import annotations

import numpy as np

from megaqwen.data_pipeline.document import Document

MULTILINGUAL_BACKENDS = ("e5", "none")


class ZeroShotDomains:
    """Cosine similarity between a document's embedding and each domain description's embedding."""

    def __init__(self, encoder, taxonomy: dict[str, str], min_similarity: float = 0.0, query: bool = False):
        self.names = list(taxonomy)
        labels = [f"{name}: {desc}" for name, desc in taxonomy.items()]
        self.label_emb_CD = encoder.encode(labels, query=True) if query else encoder.encode(labels)
        self.min_similarity = min_similarity

    def classify(self, doc_emb_ND: np.ndarray) -> list[tuple[str, float]]:
        sim_NC = doc_emb_ND @ self.label_emb_CD.T
        best = sim_NC.argmax(axis=1)
        out = []
        for i, j in enumerate(best):
            s = float(sim_NC[i, j])
            name = self.names[j] if s >= self.min_similarity or "other" not in self.names else "other"
            out.append((name, round(s, 4)))
        return out


def content_domain(doc: Document, taxonomy: dict[str, str]) -> str | None:
    """ "code" / "math" for documents the content-type pass labelled so (when the taxonomy has them)."""
    ct = doc.metadata.get("content_type")
    return ct if ct in ("code", "math") and ct in taxonomy else None


class DomainLabeler:
    """Labels a batch of documents: content first, then the configured backend (see module doc)."""

    def __init__(self, cfg, scorer_encoder=None):
        from megaqwen.data_pipeline.config import PipelineConfig

        self.cfg: PipelineConfig = cfg
        d = cfg.domains
        self.taxonomy = d.taxonomy
        self.names = list(d.taxonomy)
        self.backend = d.backend
        if d.backend == "embedding" and d.student:
            from megaqwen.data_pipeline.domain_student import load_student, student_encoder

            self.encoder, self.model = student_encoder(cfg), load_student(cfg)
        elif d.backend == "embedding":
            from megaqwen.data_pipeline.embed import get_encoder

            s = cfg.scorer
            self.encoder = get_encoder(s.encoder, s.max_length, s.batch_size, "transformer", s.threads)
            self.model = ZeroShotDomains(self.encoder, d.taxonomy, d.min_similarity)
        elif d.backend == "distilled":
            from megaqwen.data_pipeline.scorer import SoftmaxClassifier

            self.encoder = scorer_encoder
            self.model = SoftmaxClassifier.load(cfg.out / "scorer" / "domain.npz")
        else:
            from megaqwen.data_pipeline.stages import get_judge

            self.encoder, self.model = None, get_judge(cfg)
        if d.multilingual not in MULTILINGUAL_BACKENDS:
            raise ValueError(
                f"domains.multilingual must be one of {MULTILINGUAL_BACKENDS}, got {d.multilingual!r}"
            )
        self.multi: ZeroShotDomains | None = None
        self.multi_encoder = None
        if d.multilingual == "e5" and d.backend != "judge":  # the LLM judge reads every language
            from megaqwen.data_pipeline.embed import get_multilingual_encoder

            self.multi_encoder = get_multilingual_encoder(d.multilingual_max_tokens, cfg.scorer.threads)
            self.multi = ZeroShotDomains(self.multi_encoder, d.taxonomy, d.min_similarity, query=True)

    def _non_english(self, doc: Document) -> bool:
        return self.multi is not None and doc.metadata.get("language", "en") not in ("en", "und")

    def label(self, docs: list[Document], scorer_x: np.ndarray | None = None) -> list[tuple[str, float]]:
        """(domain, confidence) per document; `scorer_x` reuses the quality scorer's embeddings."""
        out: list[tuple[str, float] | None] = [None] * len(docs)
        todo, multi = [], []
        for i, doc in enumerate(docs):
            dom = content_domain(doc, self.taxonomy) if self.cfg.domains.content_first else None
            if dom is not None:
                out[i] = (dom, 1.0)
            elif self._non_english(doc):
                multi.append(i)
            else:
                todo.append(i)
        if multi:
            assert self.multi is not None and self.multi_encoder is not None
            got_m = self.multi.classify(self.multi_encoder.encode([docs[i].text for i in multi]))
            for i, g in zip(multi, got_m):
                out[i] = g
        if todo:
            texts = [docs[i].text for i in todo]
            if self.backend == "judge":
                probs = self.model.domains(texts, self.taxonomy)
                got = [(max(p, key=p.get), round(max(p.values()), 4)) for p in probs]
            else:
                reuse = self.backend == "distilled" and scorer_x is not None
                x = scorer_x[todo] if reuse else self.encoder.encode(texts)
                if isinstance(self.model, ZeroShotDomains):
                    got = self.model.classify(x)
                else:
                    p = self.model.predict_proba(x)
                    best = p.argmax(1)
                    got = [(self.model.labels[j], round(float(p[k, j]), 4)) for k, j in enumerate(best)]
            for i, g in zip(todo, got):
                out[i] = g
        return out  # type: ignore[return-value]

    def close(self) -> None:
        save = getattr(self.encoder, "save_cache", None)
        if save is not None:
            save()
