//! ClinicalTrials.gov API v2: the typed study model, page parsing (pure) and the paging client.
//!
//! The client asks `GET {base}/studies` with `query.term`, a `fields` projection of what we use,
//! `countTotal=true` and `pageToken` paging, until `max_trials` studies or the last page.
//! Every page it receives is handed back, good or bad, so the caller can store it for replay.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use url::Url;

use crate::http::{self, UpstreamError};
use crate::resilience::ServiceGuard;

/// Name used in errors, logs and metrics.
pub const SERVICE: &str = "clinicaltrials.gov";

/// The projection we ask for: exactly the fields [`Trial`] reads.
pub const STUDY_FIELDS: &str = "NCTId,BriefTitle,OverallStatus,Phase,StudyType,Condition,InterventionName,\
LeadSponsorName,EnrollmentCount,BriefSummary,StartDate,CompletionDate,MinimumAge,MaximumAge";

/// One study, as much of it as we use, plus its raw JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub nct_id: String,
    pub brief_title: Option<String>,
    pub overall_status: Option<String>,
    /// As the API spells them: `EARLY_PHASE1`, `PHASE1` … `PHASE4`, `NA`.
    pub phases: Vec<String>,
    pub study_type: Option<String>,
    pub conditions: Vec<String>,
    pub interventions: Vec<String>,
    pub lead_sponsor: Option<String>,
    pub enrollment: Option<i64>,
    pub start_date: Option<String>,
    pub completion_date: Option<String>,
    pub brief_summary: Option<String>,
    pub minimum_age: Option<String>,
    pub maximum_age: Option<String>,
    /// The study object exactly as received.
    #[serde(skip)]
    pub raw_json: String,
}

/// One parsed page of `/studies`.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub trials: Vec<Trial>,
    pub next_page_token: Option<String>,
    /// Only on the first page, and only with `countTotal=true`.
    pub total_count: Option<u64>,
    /// Studies without an NCT id, left out.
    pub skipped: usize,
}

/// A response body that is not the `/studies` JSON we expect.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unexpected response body: {0}")]
pub struct ParseError(pub String);

/// Parses one `/studies` response body.
pub fn parse_page(body: &str) -> Result<Page, ParseError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct RawPage<'a> {
        #[serde(borrow)]
        studies: Option<Vec<&'a RawValue>>,
        next_page_token: Option<String>,
        total_count: Option<u64>,
    }
    let raw: RawPage<'_> = serde_json::from_str(body).map_err(|e| {
        ParseError(format!(
            "not the JSON of a studies page ({e}); starts with: {}",
            http::excerpt(body, 80)
        ))
    })?;
    let studies = raw
        .studies
        .ok_or_else(|| ParseError("the JSON has no `studies` array".to_owned()))?;
    let mut trials = Vec::with_capacity(studies.len());
    let mut skipped = 0;
    for study in studies {
        match parse_study(study.get()) {
            Ok(Some(trial)) => trials.push(trial),
            Ok(None) => skipped += 1,
            Err(e) => return Err(ParseError(format!("a study could not be read: {e}"))),
        }
    }
    Ok(Page {
        trials,
        next_page_token: raw.next_page_token.filter(|t| !t.is_empty()),
        total_count: raw.total_count,
        skipped,
    })
}

/// Parses one study object; `Ok(None)` when it has no NCT id.
fn parse_study(json: &str) -> Result<Option<Trial>, serde_json::Error> {
    let study: wire::Study = serde_json::from_str(json)?;
    let p = study.protocol_section.unwrap_or_default();
    let id = p.identification_module.unwrap_or_default();
    let Some(nct_id) = id.nct_id.filter(|s| !s.trim().is_empty()) else {
        return Ok(None);
    };
    let status = p.status_module.unwrap_or_default();
    let design = p.design_module.unwrap_or_default();
    let eligibility = p.eligibility_module.unwrap_or_default();
    Ok(Some(Trial {
        nct_id,
        brief_title: id.brief_title,
        overall_status: status.overall_status,
        phases: design.phases.unwrap_or_default(),
        study_type: design.study_type,
        conditions: p
            .conditions_module
            .and_then(|c| c.conditions)
            .unwrap_or_default(),
        interventions: p
            .arms_interventions_module
            .and_then(|a| a.interventions)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| i.name)
            .collect(),
        lead_sponsor: p
            .sponsor_collaborators_module
            .and_then(|s| s.lead_sponsor)
            .and_then(|l| l.name),
        enrollment: design.enrollment_info.and_then(|e| e.count),
        start_date: status.start_date_struct.and_then(|d| d.date),
        completion_date: status.completion_date_struct.and_then(|d| d.date),
        brief_summary: p.description_module.and_then(|d| d.brief_summary),
        minimum_age: eligibility.minimum_age,
        maximum_age: eligibility.maximum_age,
        raw_json: json.to_owned(),
    }))
}

/// The wire shape of a study: every module and field optional.
mod wire {
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Study {
        pub protocol_section: Option<Protocol>,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase", default)]
    pub struct Protocol {
        pub identification_module: Option<Identification>,
        pub status_module: Option<Status>,
        pub sponsor_collaborators_module: Option<Sponsors>,
        pub description_module: Option<Description>,
        pub conditions_module: Option<Conditions>,
        pub design_module: Option<Design>,
        pub arms_interventions_module: Option<Arms>,
        pub eligibility_module: Option<Eligibility>,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase", default)]
    pub struct Identification {
        pub nct_id: Option<String>,
        pub brief_title: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase", default)]
    pub struct Status {
        pub overall_status: Option<String>,
        pub start_date_struct: Option<DateStruct>,
        pub completion_date_struct: Option<DateStruct>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct DateStruct {
        pub date: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase", default)]
    pub struct Sponsors {
        pub lead_sponsor: Option<Named>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Named {
        pub name: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase", default)]
    pub struct Description {
        pub brief_summary: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Conditions {
        pub conditions: Option<Vec<String>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase", default)]
    pub struct Design {
        pub study_type: Option<String>,
        pub phases: Option<Vec<String>>,
        pub enrollment_info: Option<Enrollment>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Enrollment {
        pub count: Option<i64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Arms {
        pub interventions: Option<Vec<Named>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase", default)]
    pub struct Eligibility {
        pub minimum_age: Option<String>,
        pub maximum_age: Option<String>,
    }
}

/// A response as received, stored for replay whatever its fate.
#[derive(Debug, Clone)]
pub struct RawPage {
    pub page_number: u32,
    pub request_url: String,
    pub http_status: u16,
    pub body: String,
    pub fetched_at: DateTime<Utc>,
}

/// The trials found for one term.
#[derive(Debug, Clone, Default)]
pub struct SearchResult {
    /// In the API's rank order, at most `max_trials`, without duplicates.
    pub trials: Vec<Trial>,
    pub total_count: Option<u64>,
}

/// Client settings beyond the shared HTTP ones.
#[derive(Debug, Clone)]
pub struct CtgovSettings {
    pub base_url: Url,
    pub page_size: u32,
    pub max_trials: u32,
    /// Cap on a server's `Retry-After`.
    pub max_retry_after: Duration,
}

/// The ClinicalTrials.gov client; cheap to clone, one connection pool and one [`ServiceGuard`].
#[derive(Debug, Clone)]
pub struct CtgovClient {
    http: reqwest::Client,
    guard: Arc<ServiceGuard>,
    settings: CtgovSettings,
}

impl CtgovClient {
    pub fn new(http: reqwest::Client, guard: Arc<ServiceGuard>, settings: CtgovSettings) -> Self {
        Self {
            http,
            guard,
            settings,
        }
    }

    /// The URL of one page of results for `term`.
    pub fn page_url(&self, term: &str, page_token: Option<&str>) -> Url {
        let mut url = self.settings.base_url.clone();
        url.path_segments_mut()
            .expect("validated http(s) URL")
            .pop_if_empty()
            .push("studies");
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("query.term", term)
                .append_pair("fields", STUDY_FIELDS)
                .append_pair("countTotal", "true")
                .append_pair("sort", "@relevance")
                .append_pair(
                    "pageSize",
                    &self
                        .settings
                        .page_size
                        .min(self.settings.max_trials)
                        .to_string(),
                );
            if let Some(token) = page_token {
                query.append_pair("pageToken", token);
            }
        }
        url
    }

    /// Fetches pages until `max_trials` or the last page. Each response is pushed to `record`
    /// before it is judged, so failed attempts are stored too.
    pub async fn search(
        &self,
        term: &str,
        record: &mut Vec<RawPage>,
    ) -> Result<SearchResult, UpstreamError> {
        let max = self.settings.max_trials as usize;
        let mut result = SearchResult::default();
        let mut seen = std::collections::HashSet::new();
        let mut token: Option<String> = None;
        for page_number in 1.. {
            let url = self.page_url(term, token.as_deref());
            let page = self.fetch_page(url, page_number, record).await?;
            if page_number == 1 {
                result.total_count = page.total_count;
            }
            for trial in page.trials {
                if result.trials.len() < max && seen.insert(trial.nct_id.clone()) {
                    result.trials.push(trial);
                }
            }
            match page.next_page_token {
                Some(next) if result.trials.len() < max => {
                    if token.as_deref() == Some(next.as_str()) {
                        return Err(UpstreamError::permanent(
                            SERVICE,
                            "the API returned the same nextPageToken twice; stopping to avoid a loop",
                        ));
                    }
                    token = Some(next);
                }
                _ => break,
            }
        }
        Ok(result)
    }

    /// One page, under the service's limits.
    async fn fetch_page(
        &self,
        url: Url,
        page_number: u32,
        record: &mut Vec<RawPage>,
    ) -> Result<Page, UpstreamError> {
        self.guard
            .run(self.fetch_page_unguarded(url, page_number, record))
            .await
    }

    async fn fetch_page_unguarded(
        &self,
        url: Url,
        page_number: u32,
        record: &mut Vec<RawPage>,
    ) -> Result<Page, UpstreamError> {
        let request_url = url.to_string();
        let request = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json");
        let response = http::send_and_read(SERVICE, request, self.settings.max_retry_after).await?;
        let checked = response.check_status(SERVICE);
        record.push(RawPage {
            page_number,
            request_url,
            http_status: response.status,
            body: response.body,
            fetched_at: Utc::now(),
        });
        checked?;
        let body = &record.last().expect("just pushed").body;
        parse_page(body)
            .map_err(|e| UpstreamError::permanent(SERVICE, format!("page {page_number}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL_STUDY: &str = r#"{"protocolSection":{
        "identificationModule":{"nctId":"NCT00000001","briefTitle":"Drug A in BRAF V600E melanoma"},
        "statusModule":{"overallStatus":"RECRUITING","startDateStruct":{"date":"2024-01-15"},"completionDateStruct":{"date":"2027-06"}},
        "sponsorCollaboratorsModule":{"leadSponsor":{"name":"Example Oncology"}},
        "descriptionModule":{"briefSummary":"A study."},
        "conditionsModule":{"conditions":["Melanoma","Solid Tumor"]},
        "designModule":{"studyType":"INTERVENTIONAL","phases":["PHASE1","PHASE2"],"enrollmentInfo":{"count":120}},
        "armsInterventionsModule":{"interventions":[{"name":"Drug A"},{"type":"DRUG"}]},
        "eligibilityModule":{"minimumAge":"18 Years"}}}"#;

    #[test]
    fn parses_every_field_we_use() {
        let body = format!(r#"{{"studies":[{FULL_STUDY}],"totalCount":1}}"#);
        let page = parse_page(&body).unwrap();
        assert_eq!(page.total_count, Some(1));
        assert_eq!(page.next_page_token, None);
        let t = &page.trials[0];
        assert_eq!(t.nct_id, "NCT00000001");
        assert_eq!(
            t.brief_title.as_deref(),
            Some("Drug A in BRAF V600E melanoma")
        );
        assert_eq!(t.overall_status.as_deref(), Some("RECRUITING"));
        assert_eq!(t.phases, ["PHASE1", "PHASE2"]);
        assert_eq!(t.conditions, ["Melanoma", "Solid Tumor"]);
        assert_eq!(
            t.interventions,
            ["Drug A"],
            "an intervention without a name is left out"
        );
        assert_eq!(t.lead_sponsor.as_deref(), Some("Example Oncology"));
        assert_eq!(t.enrollment, Some(120));
        assert_eq!(t.start_date.as_deref(), Some("2024-01-15"));
        assert_eq!(t.completion_date.as_deref(), Some("2027-06"));
        assert_eq!(t.minimum_age.as_deref(), Some("18 Years"));
        assert_eq!(t.maximum_age, None);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&t.raw_json).unwrap()["protocolSection"]["identificationModule"]
                ["nctId"],
            "NCT00000001"
        );
    }

    #[test]
    fn missing_optional_fields_are_fine() {
        let page = parse_page(r#"{"studies":[{"protocolSection":{"identificationModule":{"nctId":"NCT00000002"}}}],"nextPageToken":"abc"}"#).unwrap();
        let t = &page.trials[0];
        assert_eq!(t.nct_id, "NCT00000002");
        assert!(t.phases.is_empty() && t.conditions.is_empty() && t.brief_title.is_none());
        assert_eq!(page.next_page_token.as_deref(), Some("abc"));
        assert_eq!(page.total_count, None);
    }

    #[test]
    fn empty_pages_and_studies_without_ids() {
        let page = parse_page(r#"{"studies":[]}"#).unwrap();
        assert!(page.trials.is_empty());
        let page = parse_page(r#"{"studies":[{"protocolSection":{}},{}]}"#).unwrap();
        assert_eq!((page.trials.len(), page.skipped), (0, 2));
    }

    #[test]
    fn malformed_bodies_are_clear_errors() {
        for body in [
            "<html>busy</html>",
            "",
            r#"{"studies": [1,"#,
            r#"{"error":"x"}"#,
            r#"{"studies":{}}"#,
        ] {
            let err = parse_page(body).unwrap_err().to_string();
            assert!(err.starts_with("unexpected response body"), "{body}: {err}");
        }
        let err =
            parse_page(r#"{"studies":[{"protocolSection":{"designModule":{"phases":"PHASE1"}}}]}"#)
                .unwrap_err();
        assert!(err.0.contains("a study could not be read"), "{err}");
    }
}
