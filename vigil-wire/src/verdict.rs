//! Verdict records: the flows a tier may open.
