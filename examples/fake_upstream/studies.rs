//! Deterministic ClinicalTrials.gov API v2 study records, derived from the query term, in the shape
//! the real API returns for trialmatch's `fields` projection. Shared by the fake upstream and the tests.

use serde_json::{Value, json};

/// One study record.
pub fn study(nct_id: &str, title: &str, status: &str, phases: &[&str]) -> Value {
    json!({
        "protocolSection": {
            "identificationModule": { "nctId": nct_id, "briefTitle": title },
            "statusModule": {
                "overallStatus": status,
                "startDateStruct": { "date": "2025-03-01" },
                "completionDateStruct": { "date": "2028-12" }
            },
            "sponsorCollaboratorsModule": { "leadSponsor": { "name": "Test Oncology Group" } },
            "descriptionModule": { "briefSummary": format!("Summary of {title}.") },
            "conditionsModule": { "conditions": ["Melanoma", "Non-small Cell Lung Cancer"] },
            "designModule": { "studyType": "INTERVENTIONAL", "phases": phases, "enrollmentInfo": { "count": 40 } },
            "armsInterventionsModule": { "interventions": [{ "name": "Drug A" }, { "name": "Placebo" }] },
            "eligibilityModule": { "minimumAge": "18 Years" }
        }
    })
}

/// `count` studies for `term`; the same term always gives the same studies.
pub fn studies_for(term: &str, count: usize) -> Vec<Value> {
    let tag: u32 = term
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
        % 100_000;
    let statuses = [
        "RECRUITING",
        "ACTIVE_NOT_RECRUITING",
        "COMPLETED",
        "NOT_YET_RECRUITING",
    ];
    let phases: [&[&str]; 5] = [
        &["PHASE1"],
        &["PHASE2"],
        &["PHASE1", "PHASE2"],
        &["PHASE3"],
        &[],
    ];
    (0..count)
        .map(|i| {
            study(
                &format!("NCT{:05}{:03}", tag, i),
                &format!("Trial {i} of {term}"),
                statuses[i % statuses.len()],
                phases[i % phases.len()],
            )
        })
        .collect()
}
