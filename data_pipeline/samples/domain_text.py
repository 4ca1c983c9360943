"""Hand-written sentence banks for the sample corpus, one block per domain.

Each bank has slot values (`{product}`, `{city}` ...) and sentences that use them. `make_corpus.py`
draws titles, sentences and slot values with a fixed seed, so the corpus is reproducible and every
word of it was written for this repository (free to redistribute).
"""

from __future__ import annotations

BANKS: dict[str, dict] = {
    "e-commerce": {
        "slots": {
            "product": [
                "wireless earbuds",
                "standing desk",
                "espresso machine",
                "hiking backpack",
                "robot vacuum",
                "cast-iron skillet",
                "mechanical keyboard",
                "yoga mat",
                "air fryer",
                "electric toothbrush",
                "office chair",
                "rain jacket",
            ],
            "brand": ["Northwind", "Acmeline", "Bluefinch", "Corvale", "Tidemark", "Oakhaven"],
            "price": ["19.99", "34.50", "79.00", "129.99", "249.00", "399.95", "59.90"],
            "n": ["two", "three", "four", "six", "eight", "ten", "twelve"],
        },
        "titles": [
            "Review: the {brand} {product} after {n} weeks",
            "Is the {brand} {product} worth {price} dollars?",
            "Buying guide: choosing a {product}",
            "Deal alert: {product} prices compared",
        ],
        "sentences": [
            "I bought the {brand} {product} for {price} dollars after reading a dozen reviews.",
            "Shipping took {n} days and the box arrived without a dent.",
            "The {product} feels solid, although the finish picks up fingerprints quickly.",
            "Compared with the previous model, the new {product} is lighter and noticeably quieter.",
            "Customer service answered my question about the warranty within a day.",
            "At {price} dollars it is not the cheapest option, but it has outlasted two cheaper ones.",
            "The return policy gives you thirty days, which is generous for this category.",
            "Several buyers complained about the instructions, and I agree they are confusing.",
            "If you only need the basics, the entry-level version does the same job for less.",
            "After {n} weeks of daily use, the {product} still works as it did on the first day.",
            "The listing photos make the colour look brighter than it really is.",
            "Stock runs out quickly during seasonal sales, so set a price alert if you are waiting.",
            "The {brand} app is optional, which I appreciate, because it asks for too many permissions.",
            "Packaging was mostly cardboard, with very little plastic, a detail more shops should copy.",
            "A discount code from the newsletter took another ten percent off the total.",
            "My only real complaint is the short power cable, which forced me to buy an extension.",
            "The seller included spare parts, so minor repairs will not require a service visit.",
            "Reviews with photos were more useful to me than the star ratings alone.",
            (
                "I would recommend comparing the dimensions carefully, since the {product} is larger "
                "than it looks."
            ),
            "Overall, the {brand} {product} is a sensible purchase for most households.",
            "Prices for the {product} vary by up to forty percent between marketplaces on the same day.",
            "The bundle with accessories looked attractive until I priced the items separately.",
        ],
    },
    "social media": {
        "slots": {
            "platform": [
                "the photo app",
                "the microblog",
                "the video platform",
                "the forum",
                "the group chat",
                "the short-video app",
            ],
            "topic": [
                "sourdough baking",
                "urban cycling",
                "houseplants",
                "retro gaming",
                "marathon training",
                "budget travel",
                "birdwatching",
                "film photography",
            ],
            "n": ["forty", "two hundred", "three thousand", "ten thousand", "half a million"],
            "day": ["Monday", "Tuesday", "Friday", "Saturday", "Sunday"],
        },
        "titles": [
            "Thread: what {topic} taught me this year",
            "Why I took a break from {platform}",
            "My {topic} post went viral on {day}",
            "Community update: {topic} group rules",
        ],
        "sentences": [
            "Last {day} I posted a short clip about {topic} and it reached {n} people by the evening.",
            "Honestly I did not expect anyone to care, but the comments kept coming all night.",
            "A few people asked for a longer write-up, so here it is, with everything I have learned.",
            "The algorithm on {platform} seems to reward posts that start with a question.",
            "I muted most notifications for a month and my screen time dropped by half.",
            "The best part of the {topic} community is how quickly strangers share advice.",
            "Please keep replies kind; we removed several comments this week for personal attacks.",
            "Someone reposted my photo without credit, which happens more often than you would think.",
            "I started the account as a diary and it slowly turned into a small, friendly group.",
            "We now have {n} members, and the moderators are volunteers with day jobs.",
            "If you are new to {topic}, scroll back to the pinned post before asking the usual questions.",
            "Trends on {platform} come and go in days, so I stopped chasing them.",
            "My follower count matters less to me than the handful of people who reply every time.",
            "The live stream on {day} ran two hours longer than planned because the chat was so active.",
            "I am not sponsored by anyone, so these opinions are entirely my own.",
            "A poll last week showed that most of you prefer long posts to short videos.",
            "Screenshots of private messages will be removed, no exceptions.",
            "Thanks to everyone who sent photos of their {topic} projects; I read every single one.",
            "Taking a break from {platform} made me realise how much I had been comparing myself to others.",
            "Next week I will answer the most common questions in a single post.",
        ],
    },
    "entertainment": {
        "slots": {
            "show": [
                "The Lantern Keepers",
                "Harbor Lights",
                "Midnight Orchard",
                "Glass Mountain",
                "The Last Courier",
                "Salt and Ember",
            ],
            "actor": ["Mara Ellison", "Theo Varga", "Nadia Holm", "Rafael Ortun", "June Castell"],
            "n": ["six", "eight", "ten", "twelve"],
            "genre": ["mystery", "comedy", "historical drama", "science-fiction", "musical"],
        },
        "titles": [
            "{show}: season review",
            "Interview: {actor} on playing the lead in {show}",
            "Ranking every episode of {show}",
            "Why {genre} is back on television",
        ],
        "sentences": [
            "{show} returns with {n} episodes and a noticeably bigger budget.",
            "{actor} carries the first half of the season almost single-handedly.",
            "The writers lean into the {genre} elements more than in earlier seasons.",
            "Some viewers found the pacing slow, but the final two episodes pay off every thread.",
            "The soundtrack mixes original songs with a few well-chosen older tracks.",
            "Critics were divided, while audience scores stayed remarkably high.",
            "In interviews, {actor} said the hardest scene took three days to film in the rain.",
            "The production design deserves its own award, especially the night-market sets.",
            "Fans have already started theorising about the cliffhanger on every forum.",
            "A spin-off is rumoured, though the studio has not confirmed anything.",
            "The supporting cast is strong, and the comic relief never undercuts the drama.",
            "Streaming numbers placed {show} in the top ten for {n} consecutive weeks.",
            "The dubbed version changes a few jokes, so watch with subtitles if you can.",
            "Casting {actor} was a risk that clearly worked out for the producers.",
            "Its mix of {genre} and quiet character study is rare on mainstream television.",
            "The episode-three twist is best experienced without spoilers, so I will say no more.",
            "Behind-the-scenes footage shows how much of the stunt work was done practically.",
            "The premiere drew a crowd of fans who queued outside the cinema since morning.",
        ],
    },
    "news": {
        "slots": {
            "city": ["Riverton", "Port Halden", "Eastbrook", "Millford", "Caldera Bay", "Norhaven"],
            "agency": [
                "the transport authority",
                "the city council",
                "the regional water board",
                "the health department",
                "the school district",
            ],
            "n": ["12", "40", "150", "2,300", "18,000"],
            "month": ["January", "March", "May", "July", "September", "November"],
        },
        "titles": [
            "{city} approves new budget for public transport",
            "Flooding closes roads in {city}",
            "{agency} announces changes from {month}",
            "Local election results in {city}",
        ],
        "sentences": [
            "Officials in {city} confirmed on Tuesday that {agency} will change its schedule in {month}.",
            "The decision follows months of public consultation and {n} written submissions.",
            "Residents interviewed outside the town hall were split on the plan.",
            "According to {agency}, the cost will be covered by existing reserves rather than new taxes.",
            "Heavy rain overnight left {n} households without power for several hours.",
            "Emergency crews reopened the main bridge by mid-morning after inspecting the supports.",
            "The mayor said the city would publish a full report before the end of {month}.",
            "Opposition councillors argued that the timetable was too ambitious.",
            "Turnout in the local election reached its highest level in two decades.",
            "A spokesperson for {agency} declined to comment on the ongoing investigation.",
            "Businesses along the waterfront reported losses after the road closures.",
            "The regional government has promised additional funding if the pilot succeeds.",
            "Independent auditors will review the accounts of {agency} next year.",
            "Commuters can expect delays on two lines while the works are carried out.",
            "Police said no injuries were reported and the area has since been cleared.",
            "The full council will vote on the proposal again in {month}.",
            "Data released this week show that population growth in {city} has slowed.",
        ],
    },
    "technology": {
        "slots": {
            "tech": [
                "a distributed key-value store",
                "a container scheduler",
                "a vector database",
                "a message queue",
                "an inference server",
                "a build system",
                "a garbage collector",
            ],
            "metric": ["tail latency", "throughput", "memory footprint", "start-up time", "cost per request"],
            "n": ["two", "three", "five", "ten", "forty"],
            "lang": ["Rust", "Go", "C++", "Python", "Java"],
        },
        "titles": [
            "How we rebuilt {tech} in {lang}",
            "Measuring {metric} in production",
            "Lessons from scaling {tech}",
            "A practical guide to {metric}",
        ],
        "sentences": [
            "We rewrote {tech} in {lang} after profiling showed that most time was spent in serialisation.",
            "The new design cut {metric} by a factor of {n} on the same hardware.",
            (
                "Benchmarks only matter when they reflect the real request mix, so we replayed "
                "production traffic."
            ),
            "Caching helped at first, but invalidation bugs cost us more than the speed-up was worth.",
            "A single slow disk can dominate {metric} when requests fan out to many replicas.",
            "We added back-pressure so that overloaded nodes reject work instead of queueing it forever.",
            "Consensus protocols trade latency for safety, and the right balance depends on the workload.",
            "Observability came first: every request carries a trace identifier across service boundaries.",
            "Rolling upgrades let us deploy {n} times a day without a maintenance window.",
            "The hardest bugs were race conditions that appeared only under heavy load.",
            "Memory-mapped files reduced copying, at the price of more careful error handling.",
            "Choosing {lang} was less about raw speed than about predictable performance.",
            "Batching small writes into larger ones improved {metric} more than any micro-optimisation.",
            "Every configuration flag we added became a test case we had to maintain.",
            "Load tests ran nightly against a staging cluster that mirrors production topology.",
            "Schema migrations were split into expand and contract phases to avoid downtime.",
            "Documentation for on-call engineers turned out to be as important as the code itself.",
            "Quantisation to eight-bit integers halved the memory needed by the inference server.",
            "We publish the benchmark harness so that others can reproduce our numbers.",
        ],
    },
    "science": {
        "slots": {
            "field": [
                "marine biology",
                "atmospheric chemistry",
                "astrophysics",
                "plant genetics",
                "materials science",
                "neuroscience",
                "geology",
            ],
            "thing": [
                "coral reefs",
                "stratospheric ozone",
                "white dwarf stars",
                "drought-resistant wheat",
                "perovskite solar cells",
                "hippocampal neurons",
                "volcanic rock",
            ],
            "n": ["three", "seven", "twelve", "two hundred", "several thousand"],
            "unit": ["percent", "degrees", "nanometres", "kilometres"],
        },
        "titles": [
            "New findings on {thing}",
            "What {field} tells us about {thing}",
            "The physics behind {thing}",
            "A decade of research on {thing}",
        ],
        "sentences": [
            (
                "Researchers in {field} have long suspected that {thing} respond to small changes in "
                "temperature."
            ),
            "A new study followed {n} samples over four years to test that idea directly.",
            "The measurements show a shift of about {n} {unit}, larger than earlier models predicted.",
            "Controls were essential, because seasonal effects can mimic the signal being measured.",
            "The authors caution that correlation in field data does not establish a mechanism.",
            "Laboratory experiments reproduced the effect under carefully controlled conditions.",
            "Energy conservation constrains how quickly the system can return to equilibrium.",
            "Spectroscopy revealed the chemical signature of compounds that had not been detected before.",
            "Independent teams using different instruments reached consistent conclusions.",
            "The uncertainty in the estimate comes mainly from calibration rather than from noise.",
            "Understanding {thing} matters because it links small-scale processes to global patterns.",
            "Future work will test whether the result holds at other latitudes and depths.",
            "Computer simulations agree with observations only when feedback effects are included.",
            "The raw data and analysis code were published alongside the paper.",
            "Peer reviewers asked for additional statistical tests, which strengthened the conclusions.",
            "Scientists in {field} now see {thing} as a sensitive indicator of environmental change.",
            "Even a null result is informative here, since it rules out a popular hypothesis.",
            "The team plans a larger replication with {n} more sites next year.",
        ],
    },
    "academic": {
        "slots": {
            "method": [
                "a randomised controlled trial",
                "a longitudinal cohort study",
                "a meta-analysis",
                "a mixed-methods case study",
                "a systematic literature review",
            ],
            "area": [
                "second-language acquisition",
                "labour economics",
                "medieval history",
                "cognitive psychology",
                "comparative politics",
                "educational assessment",
            ],
            "n": ["48", "120", "312", "1,050", "4,400"],
        },
        "titles": [
            "Abstract: {method} in {area}",
            "Methodological notes on {area}",
            "Revisiting a classic result in {area}",
            "Literature review: {area}",
        ],
        "sentences": [
            "This paper reports {method} in {area} with {n} participants recruited across three sites.",
            "We pre-registered our hypotheses and analysis plan before data collection began.",
            "Prior work in {area} has relied heavily on small, convenience samples.",
            "Our primary outcome was specified in advance to limit researcher degrees of freedom.",
            "Effect sizes are reported with ninety-five percent confidence intervals throughout.",
            "Results replicate the direction of the original finding but with a smaller magnitude.",
            "Heterogeneity across studies was substantial, so we report random-effects estimates.",
            "We discuss threats to validity, including attrition and measurement error.",
            "Theoretical accounts in {area} disagree on whether the effect is causal.",
            "Coding of qualitative interviews was performed independently by two researchers.",
            "Inter-rater agreement was high, with a kappa coefficient above 0.8.",
            "Limitations include the reliance on self-reported measures.",
            "The findings have implications for both theory and policy in {area}.",
            "All materials, data and scripts are available in a public repository.",
            "We thank the anonymous reviewers for comments that improved the manuscript.",
            "Section four situates these results within the broader literature on {area}.",
            "Future research should test the model in non-Western populations.",
            "A sensitivity analysis excluding outliers did not change the conclusions.",
        ],
    },
    "code": {
        "slots": {
            "fn": [
                "parse_config",
                "merge_intervals",
                "retry_with_backoff",
                "chunked",
                "lru_cache_get",
                "topological_sort",
            ],
            "lang": ["Python", "Rust", "Go", "TypeScript"],
            "n": ["two", "three", "four", "ten"],
        },
        "titles": [
            "Tutorial: writing {fn} in {lang}",
            "Code review notes on {fn}",
            "Why {fn} needs tests",
            "Refactoring {fn} step by step",
        ],
        "sentences": [
            "The function {fn} is small, but it sits on the hot path of every request.",
            "In {lang}, the idiomatic version avoids mutable global state entirely.",
            "Start with a failing test that captures the edge case you care about.",
            (
                "Here is a minimal Python sketch:\n\n    def chunked(items, size):\n        for i in "
                "range(0, len(items), size):\n            yield items[i:i + size]\n"
            ),
            (
                "Sorting first turns the interval problem into a single linear scan:\n\n    "
                "intervals.sort()\n    merged = [intervals[0]]\n    for start, end in intervals[1:]:\n   "
                "     if start <= merged[-1][1]:\n            merged[-1][1] = max(merged[-1][1], end)\n  "
                "      else:\n            merged.append([start, end])\n"
            ),
            "Exponential back-off should add random jitter so that clients do not retry in lock-step.",
            (
                "A retry loop in Python can be as short as this:\n\n    for attempt in range(5):\n       "
                " try:\n            return call()\n        except TimeoutError:\n            "
                "time.sleep(2 ** attempt + random.random())\n"
            ),
            "Type hints make the contract of {fn} explicit and catch mistakes before runtime.",
            "The reviewer pointed out that {fn} silently swallowed errors, which hid a real bug.",
            "Benchmarking showed that the naive version was {n} times slower on large inputs.",
            "Naming matters: a function called {fn} should do exactly that and nothing else.",
            "Kahn's algorithm processes nodes with no incoming edges and detects cycles when some remain.",
            "We kept the public interface stable and changed only the internals.",
            "Property-based tests generated thousands of inputs and found an off-by-one error.",
            "Error messages should name the offending value and the file it came from.",
            (
                'In Go, the same helper returns an error value instead of raising an exception:\n\n    '
                'func parse(path string) (Config, error) {\n        data, err := os.ReadFile(path)\n     '
                '   if err != nil {\n            return Config{}, fmt.Errorf("read %s: %w", path, err)\n '
                '       }\n        return decode(data)\n    }\n'
            ),
            "Once the tests passed, we removed {n} helper functions that nothing used anymore.",
        ],
    },
    "math": {
        "slots": {
            "obj": [
                "prime numbers",
                "eigenvalues",
                "the harmonic series",
                "convex functions",
                "modular arithmetic",
                "random walks",
                "the binomial theorem",
            ],
            "n": ["2", "3", "5", "7", "10"],
        },
        "titles": [
            "An introduction to {obj}",
            "A short proof about {obj}",
            "Exercises on {obj}",
            "Why {obj} matter",
        ],
        "sentences": [
            "We begin with a definition and build intuition for {obj} through small examples.",
            "Suppose n is a positive integer; then n^2 - n is always even, since it equals n(n - 1).",
            "The harmonic series 1 + 1/2 + 1/3 + ... diverges, although its terms tend to zero.",
            "A function f is convex when f(t x + (1 - t) y) <= t f(x) + (1 - t) f(y) for all t in [0, 1].",
            "Euclid's argument shows there are infinitely many primes: multiply any finite list and add one.",
            "For a symmetric matrix, eigenvectors belonging to distinct eigenvalues are orthogonal.",
            "By the binomial theorem, (a + b)^{n} expands into {n} + 1 terms with binomial coefficients.",
            "Working modulo {n}, every integer is congruent to exactly one of 0, 1, ..., {n} - 1.",
            "A simple random walk on the integers returns to its starting point with probability one.",
            (
                "The proof proceeds by induction: check the base case, then assume the claim for k and "
                "prove it for k + 1."
            ),
            "Try the exercise before reading the solution; the key step is a clever substitution.",
            "Geometric intuition helps, but every step must still be justified algebraically.",
            "The expected value of a fair six-sided die is 3.5, the average of its faces.",
            "Fermat's little theorem states that a^p is congruent to a modulo a prime p.",
            "Many results about {obj} were first conjectured from numerical experiments.",
            "The sum of the first n odd numbers equals n^2, which a picture of nested squares makes obvious.",
            "Counterexamples are as valuable as proofs, because they mark the limits of a statement.",
        ],
    },
    "health": {
        "slots": {
            "cond": [
                "high blood pressure",
                "seasonal allergies",
                "type 2 diabetes",
                "lower back pain",
                "iron deficiency",
                "insomnia",
            ],
            "n": ["twenty", "thirty", "one hundred and fifty", "seven", "eight"],
        },
        "titles": [
            "Understanding {cond}",
            "Living with {cond}: practical advice",
            "What the evidence says about {cond}",
            "Questions to ask your doctor about {cond}",
        ],
        "sentences": [
            "{cond} affects millions of adults, many of whom do not know they have it.",
            "This article is general information and does not replace advice from a clinician.",
            "Regular physical activity, around {n} minutes most days, helps many people manage {cond}.",
            "Diet changes work best when they are small and sustainable rather than drastic.",
            "Doctors usually confirm the diagnosis with simple tests before recommending treatment.",
            "Medication can be very effective, but side effects should be discussed openly.",
            "Sleep, stress and alcohol all influence symptoms more than people expect.",
            "Keeping a short diary of symptoms makes appointments more productive.",
            "Large trials have shown that early treatment reduces the risk of complications.",
            "Supplements are not regulated like medicines, so quality varies widely between brands.",
            "If symptoms change suddenly, seek medical advice rather than waiting.",
            "Family history raises the risk of {cond}, but lifestyle still plays a large role.",
            "Nurses and pharmacists are often the quickest source of practical guidance.",
            "Aim for about {n} hours of sleep, with a consistent bedtime on weekdays and weekends.",
            "Public health campaigns have reduced smoking, which in turn lowered related illnesses.",
            "Screening programmes catch many cases before any symptoms appear.",
        ],
    },
    "law": {
        "slots": {
            "area": [
                "tenancy law",
                "employment contracts",
                "copyright",
                "data protection",
                "consumer rights",
                "small-claims procedure",
            ],
            "n": ["fourteen", "thirty", "sixty", "ninety"],
        },
        "titles": [
            "A plain-language guide to {area}",
            "Recent changes in {area}",
            "Common misunderstandings about {area}",
            "Case note: a dispute over {area}",
        ],
        "sentences": [
            "This guide explains the basics of {area}; it is not legal advice for a particular case.",
            "Under most regimes, notice must be given in writing at least {n} days in advance.",
            "Courts look at the substance of an agreement, not only at the label the parties gave it.",
            "A contract term that is hidden in small print may be unenforceable against a consumer.",
            "The burden of proof usually lies with the party making the claim.",
            "Limitation periods mean that a claim can be lost simply by waiting too long.",
            "In the case discussed here, the tribunal found that the dismissal was procedurally unfair.",
            "Keeping copies of letters, receipts and messages is the simplest way to protect yourself.",
            "Fair use and fair dealing exceptions in {area} differ significantly between countries.",
            "Regulators can impose fines, but individuals may also have a private right of action.",
            "Mediation resolves many disputes faster and more cheaply than litigation.",
            "The appeal court clarified how the statute should be interpreted in future cases.",
            "Parties may agree on a governing law, within limits set by mandatory rules.",
            "Legal aid is available for some matters, depending on income and the merits of the case.",
            "Recent reforms in {area} shortened deadlines and simplified the forms.",
            "When in doubt, a short consultation with a qualified lawyer is money well spent.",
        ],
    },
    "finance": {
        "slots": {
            "asset": [
                "index funds",
                "government bonds",
                "dividend stocks",
                "money-market funds",
                "real estate investment trusts",
            ],
            "n": ["three", "five", "ten", "twenty", "thirty"],
            "pct": ["2", "4", "6", "7", "12"],
        },
        "titles": [
            "A beginner's view of {asset}",
            "How interest rates affect {asset}",
            "Budgeting basics and {asset}",
            "Risk and return in {asset}",
        ],
        "sentences": [
            "Over {n} years, fees matter as much as returns, because they compound too.",
            "{asset} spread risk across many holdings, which reduces the impact of any single failure.",
            "When central banks raise rates, existing bonds lose value because new ones pay more.",
            "An emergency fund covering a few months of expenses should come before investing.",
            "Past returns of {pct} percent a year are no guarantee of future performance.",
            "Inflation quietly erodes cash savings, especially when rates are low.",
            "Diversification does not eliminate risk; it removes the risk that is specific to one company.",
            "Rebalancing once a year keeps the portfolio close to its intended allocation.",
            "Tax-advantaged accounts can add more to long-run returns than clever stock picking.",
            "Market timing is tempting, but missing a handful of the best days sharply lowers returns.",
            "Quarterly earnings reports move prices, though the long-term trend depends on cash flow.",
            "A simple budget tracks income, fixed costs and discretionary spending separately.",
            "Credit card debt at high interest should usually be paid off before investing in {asset}.",
            "Analysts disagree on valuations, which is exactly why prices fluctuate.",
            "Liquidity matters: some {asset} can be sold instantly, others take weeks.",
            "An allocation of {pct} percent to cash gives flexibility without dragging returns much.",
        ],
    },
}

# Sentences that fit any domain; several per document make the prose read less like a list and keep
# two documents of the same domain far apart in word n-grams (so dedup must not merge them).
GENERIC = [
    "It is worth looking at the details before drawing conclusions, because first impressions mislead.",
    "That said, the situation is more nuanced than it first appears, and reasonable people disagree.",
    "In the rest of this piece I try to explain why, starting with the simplest part of the story.",
    "The numbers tell only part of the story; the people involved tell the rest.",
    "Context matters, and so does the history behind it, which is often left out of short summaries.",
    "To summarise, the evidence points in a fairly clear direction, even if some questions remain open.",
    "There is still a lot we do not know, and admitting that is better than pretending otherwise.",
    "Readers who want more detail will find a list of references and further reading at the end.",
    "A friend who works in the field read an early draft and suggested several useful corrections.",
    "Looking back over the last few years, the direction of change has been surprisingly consistent.",
    "One practical consequence is that small decisions made early tend to have large effects later.",
    "Trade-offs are unavoidable here, and the right choice depends on what you value most.",
    "Several people asked me to write this up properly, so this is a longer version of an earlier note.",
    "The most common mistake is to generalise from a single memorable example.",
    "It helps to separate what is known for certain from what is merely plausible.",
    "Costs and benefits rarely fall on the same people, which explains much of the disagreement.",
    "Over time, the initial excitement gave way to a more careful and realistic assessment.",
    "Whatever your starting point, the basic principles described here still apply.",
    "Experts I spoke to were cautious, noting that conditions vary a great deal from place to place.",
    "I have tried to keep the jargon to a minimum and to define terms where they first appear.",
    "None of this is new, but it is easy to forget when things are going well.",
    "A useful habit is to write down your assumptions and revisit them after a few months.",
    "Comparisons across countries are tricky, since definitions and reporting standards differ.",
    "The short answer is that it depends; the long answer is the rest of this article.",
    "Surveys suggest that most people hold moderate views that rarely make the headlines.",
    "If there is one lesson to take away, it is that patience usually pays off.",
    "Some of the best insights came from questions that seemed naive at first.",
    "Public discussion tends to focus on extremes, while everyday reality sits in the middle.",
    "Costs have fallen steadily, which has opened the topic to a much wider audience.",
    "Anecdotes are a good starting point for questions but a poor basis for answers.",
    "Good information is abundant, but so is confident misinformation, so check your sources.",
    "Many of the improvements came from small, incremental changes rather than a single breakthrough.",
    "Regulation, culture and technology all push in slightly different directions at once.",
    "An honest comparison has to include the option of doing nothing at all.",
    "The details below are drawn from public reports and from my own notes.",
    "Changing course is not a failure; it is what learning looks like in practice.",
    "Beginners and experts alike benefit from revisiting the fundamentals now and then.",
    "What looks like a sudden shift is usually the visible end of a long, slow process.",
    "Feedback from readers has been invaluable, and several sections were rewritten because of it.",
    "Finally, I want to thank everyone who shared their experience for this article.",
]

# Short passages in other languages, written for this corpus (language-id must drop them).
NON_ENGLISH = {
    "fr": (
        "La bibliothèque municipale ouvre ses portes tous les matins à neuf heures. Les lecteurs "
        "peuvent emprunter jusqu'à cinq livres pendant trois semaines, et le personnel aide "
        "volontiers à trouver des ouvrages rares. Pendant l'été, des ateliers de lecture sont "
        "proposés aux enfants du quartier, et les adultes peuvent suivre des cours d'informatique."
    ),
    "de": (
        "Der Zug nach München fährt heute wegen Bauarbeiten zwanzig Minuten später ab. Reisende "
        "werden gebeten, auf die Durchsagen am Bahnsteig zu achten. Die Bahn entschuldigt sich für "
        "die Unannehmlichkeiten und empfiehlt, die Verbindung vor der Abfahrt in der App zu prüfen."
    ),
    "es": (
        "El mercado del barrio abre los sábados desde muy temprano. Los agricultores traen frutas "
        "y verduras de temporada, y muchos vecinos aprovechan para comprar pan recién hecho. Por "
        "la tarde, la plaza se llena de familias y músicos que tocan hasta que se pone el sol."
    ),
    "zh": (
        "今天的天气很好，我们一家人去公园散步。孩子们在草地上放风筝，老人们在树下下棋。"
        "傍晚的时候，我们在湖边吃了晚饭，然后慢慢地走回家。这是一个轻松愉快的周末。"
    ),
    "ru": (
        "Вчера в городе прошёл первый снег. Дети радовались и лепили снеговиков во дворах, а "
        "взрослые спешили на работу и осторожно ходили по скользким тротуарам. Синоптики обещают, "
        "что к выходным снова потеплеет."
    ),
    "it": (
        "Il museo della città ha inaugurato una nuova sala dedicata alla storia del porto. I "
        "visitatori possono vedere modelli di navi antiche, mappe originali e fotografie dei "
        "pescatori che lavoravano qui più di cento anni fa."
    ),
}
