//! The study: the main federated model plus the paper's controls, each one federated
//! training of its own ("experiment"), run one after another by the coordinator.
//!
//! | id | who trains | input | what it answers |
//! |---|---|---|---|
//! | `main` | all sites | US + SWE | the paper's model |
//! | `loso-<site>` | all sites but one | US + SWE | external validation on the held-out site |
//! | `us-only`, `swe-only` | all sites | one modality | is the second modality worth it? |
//! | `resnet50-c` | all sites | US + SWE + clinical in the head | offline SVM fusion vs in-network fusion |

use serde::{Deserialize, Serialize};

use crate::ids::SiteId;

/// Which crops feed the shared trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputMode {
    Both,
    UsOnly,
    SweOnly,
}

/// One federated training of the study.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Experiment {
    pub id: String,
    pub input: InputMode,
    pub clinical_in_head: bool,
    /// The site left out of training (leave-one-site-out), if any.
    pub held_out: Option<SiteId>,
}

/// The id of the main experiment.
pub const MAIN: &str = "main";
pub const US_ONLY: &str = "us-only";
pub const SWE_ONLY: &str = "swe-only";
pub const RESNET50_C: &str = "resnet50-c";

impl Experiment {
    pub fn main() -> Self {
        Self { id: MAIN.into(), input: InputMode::Both, clinical_in_head: false, held_out: None }
    }

    /// Sites that train in this experiment.
    pub fn participants<'a>(&'a self, sites: &'a [SiteId]) -> impl Iterator<Item = &'a SiteId> + 'a {
        sites.iter().filter(move |s| Some(*s) != self.held_out.as_ref())
    }

    pub fn trains(&self, site: &SiteId) -> bool {
        self.held_out.as_ref() != Some(site)
    }
}

/// Which controls to run besides the main model (`[study]` in the coordinator config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyConfig {
    /// One extra federation per site, trained without it and tested on it.
    #[serde(default)]
    pub leave_one_site_out: bool,
    /// US-only and SWE-only federations (+ clinical variables in the SVM).
    #[serde(default)]
    pub modality_controls: bool,
    /// The ResNet50+C control: clinical variables fed into the penultimate FC layer.
    #[serde(default)]
    pub clinical_in_head_control: bool,
}

impl StudyConfig {
    /// The experiments in the order they run; `main` first.
    pub fn plan(&self, sites: &[SiteId]) -> Vec<Experiment> {
        let mut v = vec![Experiment::main()];
        if self.modality_controls {
            for (id, input) in [(US_ONLY, InputMode::UsOnly), (SWE_ONLY, InputMode::SweOnly)] {
                v.push(Experiment { id: id.into(), input, clinical_in_head: false, held_out: None });
            }
        }
        if self.clinical_in_head_control {
            v.push(Experiment { id: RESNET50_C.into(), input: InputMode::Both, clinical_in_head: true, held_out: None });
        }
        if self.leave_one_site_out && sites.len() > 1 {
            for s in sites {
                v.push(Experiment { id: format!("loso-{s}"), input: InputMode::Both, clinical_in_head: false, held_out: Some(s.clone()) });
            }
        }
        v
    }
}

impl From<&Experiment> for aln_proto::Experiment {
    fn from(e: &Experiment) -> Self {
        aln_proto::Experiment {
            id: e.id.clone(),
            input_mode: match e.input {
                InputMode::Both => aln_proto::InputMode::Both,
                InputMode::UsOnly => aln_proto::InputMode::UsOnly,
                InputMode::SweOnly => aln_proto::InputMode::SweOnly,
            } as i32,
            clinical_in_head: e.clinical_in_head,
        }
    }
}

impl TryFrom<aln_proto::Experiment> for Experiment {
    type Error = crate::Error;
    /// A site's view of an experiment (it is never told who is held out).
    fn try_from(e: aln_proto::Experiment) -> crate::Result<Self> {
        let input = match aln_proto::InputMode::try_from(e.input_mode) {
            Ok(aln_proto::InputMode::Both) => InputMode::Both,
            Ok(aln_proto::InputMode::UsOnly) => InputMode::UsOnly,
            Ok(aln_proto::InputMode::SweOnly) => InputMode::SweOnly,
            _ => return Err(crate::Error::MalformedPayload(format!("experiment {:?}: unknown input mode {}", e.id, e.input_mode))),
        };
        if e.id.is_empty() {
            return Err(crate::Error::MalformedPayload("experiment without an id".into()));
        }
        Ok(Self { id: e.id, input, clinical_in_head: e.clinical_in_head, held_out: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_lists_main_first_and_every_control() {
        let sites: Vec<SiteId> = ["a", "b", "c"].iter().map(|s| SiteId::new(*s).unwrap()).collect();
        assert_eq!(StudyConfig::default().plan(&sites), vec![Experiment::main()]);
        let all = StudyConfig { leave_one_site_out: true, modality_controls: true, clinical_in_head_control: true }.plan(&sites);
        let ids: Vec<&str> = all.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["main", "us-only", "swe-only", "resnet50-c", "loso-a", "loso-b", "loso-c"]);
        let loso_b = &all[5];
        assert!(!loso_b.trains(&sites[1]) && loso_b.trains(&sites[0]));
        assert_eq!(loso_b.participants(&sites).count(), 2);
    }
}
